"""CLIP's special token ids (the start and end of every tokenized text) and its text context's length.

The one definition of these ids for the package (tokenizer, model, generation, export); this module imports
nothing, so any module can import it.
"""

SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77  # tokens of a tokenized text, its start and end tokens included
CAPTION_TOKENS = CONTEXT_LENGTH - 2  # the longest text a context holds between its start and end tokens

__all__ = ["CAPTION_TOKENS", "CONTEXT_LENGTH", "EOT_ID", "SOT_ID"]
