"""CLIP's special token ids: the start and end of every tokenized text.

The one definition of these ids for the package (tokenizer, model, generation, export); this module imports
nothing, so any module can import it.
"""

SOT_ID = 49406
EOT_ID = 49407

__all__ = ["EOT_ID", "SOT_ID"]
