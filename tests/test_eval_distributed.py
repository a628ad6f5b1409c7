"""Evaluation shared over processes (gloo, CPU): each process encodes every other batch and process 0 scores;
the report equals one process's, through ``Evaluator`` and through ``famevil-fast eval``; an error in any
process, process 0's scoring included, is raised in every process, which stay in step."""

import json
import os
import time
from collections.abc import Callable
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from helpers import EmbeddingStub, free_port, join_as_torchrun, leave_process_group, stub_config

from famevil_fast.eval import runner
from famevil_fast.eval.runner import EvalOptions, Evaluator
from famevil_fast.eval.sharding import EvalShard
from famevil_fast.train.distributed import collective_timeout

TASKS = ("itc", "tgir", "scr", "cap")
BATCH = 7  # 61 views of 22 products: 9 batches, an uneven share; TGIR: 3 query and 2 gallery batches


def _options(references: str = "clip") -> EvalOptions:
    return EvalOptions(caption_max_len=6, caption_references=references, text_batch=5)


def _evaluator(data, references: str = "clip") -> Evaluator:
    return Evaluator.build(data, TASKS, 32, BATCH, device="cpu", backend="pil", options=_options(references))


def _metrics(results) -> dict:
    return {f"{r.task}/{r.protocol}/{k}": v for r in results for k, v in r.metrics.items()}


def _capped(model, data, shard: EvalShard = runner.ONE_PROCESS) -> list:
    """XMR and TGIR with ``max_samples``, called with ``shard`` (``Evaluator`` leaves a capped evaluation to
    process 0): the images and queries shared out, the capped TGIR gallery encoded by process 0 alone."""
    sets = Evaluator.build(data, ("itc", "tgir"), 32, BATCH, device="cpu", backend="pil").sets
    opts = EvalOptions(text_batch=5, max_samples=10)
    return runner.evaluate_xmr(model, sets["itc"], opts, shard) + runner.evaluate_tgir(
        model, sets["tgir"], opts, shard
    )


def _record_scored_inputs(setattr=setattr) -> dict:
    """Wrap the runner's scoring functions so that what they receive (captions and references, SCR logits,
    XMR embeddings) is recorded: the scores of a near-random micro model alone would hide a mix-up."""
    seen: dict = {}

    def recording(name, fn, keep):
        def wrapper(*args, **kwargs):
            seen[name] = keep(*args)
            return fn(*args, **kwargs)

        return wrapper

    setattr(runner, "fic_result", recording("fic", runner.fic_result, lambda p, r: [list(p), list(r)]))
    setattr(
        runner,
        "scr_result",
        recording("scr", runner.scr_result, lambda lg, lb, *_: [lg.tolist(), lb.tolist()]),
    )
    setattr(runner, "xmr_full", recording("xmr", runner.xmr_full, lambda *args: [t.tolist() for t in args]))
    return seen


def _inference(model_dir: str, data: str, out: str, tag: str, ports: tuple[int, ...] = ()) -> dict:
    """``famevil-fast embed`` and ``caption`` over the validation images (8 batches of 8), as run by this
    process (under torchrun, each command with its own rendezvous port of ``ports``): exit codes, what it
    printed, and whether it wrote the embeddings file."""
    import contextlib
    import io

    from famevil_fast.cli.main import main

    images, texts = f"{data}/FashionGen/val", f"{out}/texts.txt"
    common = ["--batch-size", "8", "--device", "cpu"]
    commands = [
        ["embed", model_dir, "--images", images, "--texts", texts, "--out", f"{out}/{tag}.safetensors"]
        + common,
        ["caption", model_dir, images, "--max-len", "4", *common],
    ]
    printed, codes = io.StringIO(), []
    for i, command in enumerate(commands):
        if ports:
            os.environ["MASTER_PORT"] = str(ports[i])
        with contextlib.redirect_stdout(printed):
            codes.append(main(command))
    wrote = os.path.exists(f"{out}/{tag}.safetensors")
    return {"exit": codes, "printed": printed.getvalue(), "wrote": wrote}


def _broken_images(data: str, out: str) -> str:
    """A copy of the validation images in which the fourth file (in batch 1 of batches of 3: process 1's
    share) is not an image."""
    import shutil

    folder = f"{out}/broken_images"
    shutil.copytree(f"{data}/FashionGen/val", folder)
    with open(sorted(os.scandir(folder), key=lambda e: e.name)[3].path, "wb") as f:
        f.write(b"not an image")
    return folder


def _worker(rank: int, world: int, ports: tuple[int, ...], data: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from famevil_fast.cli.main import main
    from famevil_fast.model import FameViL

    join_as_torchrun(rank, world, ports[0])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=collective_timeout())
    model = FameViL.from_pretrained(model_dir).eval()
    seen = _record_scored_inputs()
    results = {}
    for references in ("clip", "raw"):
        report = _evaluator(data, references).report(model)
        results[references] = _metrics(report.results) if rank == 0 else len(report.results)
        results[f"{references}_inputs"] = dict(seen)
        seen.clear()
    capped = _capped(model, data, EvalShard.of_process_group())
    results["capped"] = _metrics(capped) if rank == 0 else len(capped)
    dist.destroy_process_group()
    # the command line under torchrun's environment: it joins the group itself and prints on rank 0 only
    join_as_torchrun(rank, world, ports[1])
    args = [
        "eval",
        model_dir,
        "--data",
        data,
        "--batch-size",
        str(BATCH),
        "--max-len",
        "6",
        "--device",
        "cpu",
    ]
    results["cli_exit"] = main([*args, "--out", f"{out}/cli_rank{rank}.json"])
    join_as_torchrun(rank, world, ports[2])
    results["inference"] = _inference(model_dir, data, out, f"embed_rank{rank}", ports[2:4])
    # a corrupt image in process 1's share: every process stops with the same one-line error
    join_as_torchrun(rank, world, ports[4])
    import contextlib
    import io

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(
            [
                "embed",
                model_dir,
                "--images",
                f"{out}/broken_images",  # made before the processes start
                "--out",
                f"{out}/x.safetensors",
                "--batch-size",
                "3",
                "--device",
                "cpu",
            ]
        )
    results["broken"] = {"exit": code, "stderr": errors.getvalue()}
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    leave_process_group()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from test_cli import MICRO, perturb_
    from test_data_fixtures import synthetic

    from famevil_fast.model import FameViL

    data = synthetic(tmp_path_factory, products=150, image_size=40)
    model_dir = tmp_path_factory.mktemp("model") / "micro"
    perturb_(FameViL(MICRO), std=0.05).save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("ranks")
    _broken_images(str(data), str(out))
    (out / "texts.txt").write_text("\n".join(f"text number {i}" for i in range(13)) + "\n")
    mp.spawn(
        _worker,
        args=(2, tuple(free_port() for _ in range(5)), str(data), str(model_dir), str(out)),
        nprocs=2,
        join=True,
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return data, model_dir, out, ranks


@pytest.mark.slow
@pytest.mark.parametrize("references", ["clip", "raw"])
def test_two_processes_report_what_one_process_reports(shared, references, monkeypatch):
    from famevil_fast.model import FameViL

    data, model_dir, _, ranks = shared
    model = FameViL.from_pretrained(model_dir).eval()
    seen = _record_scored_inputs(monkeypatch.setattr)
    expected = _metrics(_evaluator(data, references).report(model).results)
    protocols = {key.rsplit("/", 1)[0] for key in expected}
    assert protocols == {"xmr/full", "xmr/sampled-21", "tgir/fashioniq-val", "scr/val", "fic/coco-caption"}
    assert ranks[0][references] == pytest.approx(expected, rel=1e-5)
    assert ranks[1][references] == 0  # the other process encodes its share and reports nothing
    inputs = ranks[0][f"{references}_inputs"]
    assert inputs["fic"] == json.loads(json.dumps(seen["fic"]))  # the same captions and references, in order
    assert len(inputs["fic"][0]) == 61 and len(set(inputs["fic"][1])) == 22
    for got, want in zip(inputs["scr"] + inputs["xmr"], seen["scr"] + seen["xmr"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert ranks[1][f"{references}_inputs"] == {}  # nothing is scored there


@pytest.mark.slow
def test_a_capped_evaluation_shared_out_scores_what_one_process_scores(shared):
    from famevil_fast.model import FameViL

    data, model_dir, _, ranks = shared
    expected = _metrics(_capped(FameViL.from_pretrained(model_dir).eval(), data))
    assert {key.split("/")[0] for key in expected} == {"xmr", "tgir"}
    assert ranks[0]["capped"] == pytest.approx(expected, rel=1e-5)
    assert ranks[1]["capped"] == 0


@pytest.mark.slow
def test_eval_command_under_torchrun_writes_one_report(shared, tmp_path):
    from famevil_fast.cli.main import main

    data, model_dir, out, ranks = shared
    assert [r["cli_exit"] for r in ranks] == [0, 0]
    assert not (out / "cli_rank1.json").exists()
    alone = tmp_path / "alone.json"
    args = ["eval", str(model_dir), "--data", str(data), "--batch-size", str(BATCH), "--max-len", "6"]
    assert main([*args, "--device", "cpu", "--out", str(alone)]) == 0
    shared_report = json.loads((out / "cli_rank0.json").read_text())["results"]
    single = json.loads(alone.read_text())["results"]
    assert [r["task"] for r in shared_report] == [r["task"] for r in single]
    for a, b in zip(shared_report, single):
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5)


class _Batches:
    """An ``EvalBatches``-like set that records which steps it was asked to make."""

    def __init__(self, n: int) -> None:
        self.n, self.made = n, []

    def __len__(self) -> int:
        return self.n

    def iter_steps(self, steps):
        for step in steps:
            self.made.append(step)
            yield step, {"x": torch.tensor([step])}


def test_a_shard_makes_only_its_own_batches():
    batches = _Batches(7)
    local = list(EvalShard(1, 3)._owned(batches))
    assert [step for step, _ in local] == [1, 4] == batches.made
    plain = [{"x": torch.tensor([i])} for i in range(7)]
    assert [step for step, _ in EvalShard(2, 3)._owned(plain)] == [2, 5]
    assert EvalShard().map_batches(plain, lambda b: int(b["x"])) == list(range(7))


@pytest.mark.parametrize("rank, world", [(-1, 2), (2, 2), (0, 0), (True, 2)])
def test_a_shard_outside_its_world_is_refused(rank, world):
    with pytest.raises(ValueError, match="expected 0 <= rank < world"):
        EvalShard(rank, world)


@pytest.mark.slow
def test_embed_and_caption_under_torchrun_give_what_one_process_gives(shared):
    from safetensors.torch import load_file

    data, model_dir, out, ranks = shared
    alone = _inference(str(model_dir), str(data), str(out), "embed_alone")
    assert alone["exit"] == [0, 0] and [r["inference"]["exit"] for r in ranks] == [[0, 0], [0, 0]]
    assert [r["inference"]["wrote"] for r in ranks] == [True, False]  # rank 0 writes the file
    shared_file = load_file(str(out / "embed_rank0.safetensors"))
    single = load_file(str(out / "embed_alone.safetensors"))
    assert shared_file["image"].shape == (61, single["image"].shape[1]) and single["text"].shape[0] == 13
    for key in ("image", "text"):
        torch.testing.assert_close(shared_file[key], single[key], rtol=1e-5, atol=1e-6)
    captions = [line for line in alone["printed"].splitlines() if "\t" in line]
    assert len(captions) == 61 and captions == sorted(captions)  # every image, in file order
    assert [line for line in ranks[0]["inference"]["printed"].splitlines() if "\t" in line] == captions
    assert "\t" not in ranks[1]["inference"]["printed"]  # only rank 0 prints


@pytest.mark.slow
def test_a_corrupt_image_in_one_process_s_share_stops_every_process_with_one_line(shared):
    *_, ranks = shared
    for rank, r in enumerate(ranks):
        assert r["broken"]["exit"] == 2, (rank, r["broken"])
        lines = r["broken"]["stderr"].strip().splitlines()
        assert len(lines) == 1 and "famevil-fast embed: error: cannot read image" in lines[0], lines
    assert "(in process 1 of 2)" in ranks[0]["broken"]["stderr"]  # rank 0 names where it happened


def _holds_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, tuple | list):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, dict) and any(_holds_tensor(v) for v in value.values())


def _rows_of_sets(shard: EvalShard) -> dict:
    """What the runner's ``_each_batch`` gives for a set whose rows are all in process 1's batches, and for
    one with no rows at all (an error in every process)."""

    def rows(step: int, n: int) -> dict:
        return {"pixels": torch.full((n, 1), float(step))}

    in_process_1 = runner._each_batch(
        shard, [rows(s, s % 2) for s in range(4)], "pixels", lambda b: b["pixels"]
    )
    try:
        runner._required(runner._each_batch(shard, [rows(s, 0) for s in range(4)], "pixels", len), "SCR")
        empty = None
    except ValueError as exc:
        empty = str(exc)
    return {"in_process_1": [t.tolist() for t in in_process_1], "empty": empty}


def _error_of(fn) -> str | None:
    try:
        fn()
    except ZeroDivisionError as exc:
        return str(exc)
    return None


def _exchange_worker(rank: int, world: int, port: int, out: str) -> None:
    """``map_batches`` and ``gather`` in one of ``world`` processes: what this process receives, and
    whether any tensor went through ``all_gather_object`` (to every process)."""
    import torch.distributed as dist

    join_as_torchrun(rank, world, port)
    dist.init_process_group("gloo", timeout=collective_timeout())
    all_gather, to_everyone = dist.all_gather_object, []

    def recording(parts, obj, *args, **kwargs):
        to_everyone.append(_holds_tensor(obj))
        return all_gather(parts, obj, *args, **kwargs)

    dist.all_gather_object = recording
    shard = EvalShard.of_process_group()
    batches = [{"x": torch.full((2,), float(step))} for step in range(5)]

    def failing(batch: dict) -> torch.Tensor:
        if int(batch["x"][0]) == 3:  # process 1's second batch
            raise ValueError("cannot read image 3")
        return batch["x"]

    try:
        shard.map_batches(batches, failing)
        error = None
    except ValueError as exc:
        error = str(exc)
    results = {
        "outputs": [t.tolist() for t in shard.map_batches(batches, lambda b: b["x"] * 2)],
        "gathered": shard.gather([(shard.rank, f"from {shard.rank}")]),
        "error": error,
        "tensors_to_everyone": any(to_everyone),
        "any": [shard.any_process(shard.rank == 1), shard.any_process(False)],
        "broadcast": [
            shard.broadcast(f"from {shard.rank}"),
            shard.broadcast(torch.arange(3) * (shard.rank + 1)),
        ],
        "rows": _rows_of_sets(shard),
        "on_main": shard.on_main(lambda: f"by {shard.rank}"),
        "on_main_error": _error_of(lambda: shard.on_main(lambda: 1 // shard.rank)),
    }
    results["broadcast"][1] = results["broadcast"][1].tolist()
    with open(f"{out}/exchange{rank}.json", "w") as f:
        json.dump(results, f)
    leave_process_group()


@pytest.mark.slow
def test_outputs_travel_to_process_0_alone_and_errors_to_every_process(tmp_path):
    mp.spawn(_exchange_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    main, other = (json.loads((tmp_path / f"exchange{r}.json").read_text()) for r in range(2))
    assert main["outputs"] == [[2.0 * step] * 2 for step in range(5)]  # every batch, in order
    assert main["gathered"] == ["from 0", "from 1"]
    assert other["outputs"] == [] and other["gathered"] == []  # nothing is sent to the other process
    assert not main["tensors_to_everyone"] and not other["tensors_to_everyone"]
    assert main["error"] == "cannot read image 3 (in process 1 of 2)"  # the failure reaches every process
    assert other["error"] == "cannot read image 3"
    for rank, got in enumerate((main, other)):
        assert got["any"] == [True, False], rank
        assert got["broadcast"] == ["from 0", [0, 1, 2]], rank  # process 0's value in every process
        assert (
            got["rows"]["empty"]
            == "the SCR evaluation set has no samples: its images are missing or undecodable"
        )
    assert main["rows"]["in_process_1"] == [[[1.0]], [[3.0]]] and other["rows"]["in_process_1"] == []
    assert main["on_main"] == "by 0" and other["on_main"] is None  # computed and kept by process 0
    assert main["on_main_error"] == "integer division or modulo by zero"
    assert other["on_main_error"] == "integer division or modulo by zero (in process 0 of 2)"


class _TaskStub(EmbeddingStub):
    """A model of every task for hand-made sets: embeddings, compositions and logits are the inputs
    (normalised), every caption is "a dress"; NaN pixels give NaN logits, as a diverged model does."""

    training = False
    config = stub_config(TASKS)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def compose(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixels + input_ids, "tgir")

    def classify(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return pixels.double()

    def caption(self, pixels: torch.Tensor, **kwargs) -> list[str]:
        return ["a dress"] * pixels.shape[0]


def _hand_made_sets(logit: float = 1.0) -> dict:
    """A set of 12 samples per task in batches of 3, shared out over the processes; every SCR logit is
    ``logit``."""
    from famevil_fast.data.eval_sets import CapEval, SCREval, TGIRCategoryEval, TGIREval, XMREval

    rows = torch.randn(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids, zeros = torch.arange(12), torch.zeros(12, 4, dtype=torch.long)

    def batches(**columns: torch.Tensor) -> list[dict]:
        return [{k: v[i : i + 3] for k, v in columns.items()} for i in range(0, 12, 3)]

    texts = {"input_ids": rows + 0.1, "product_ids": ids, "subcategory": ids * 0}
    queries = batches(ref_pixels=rows, input_ids=zeros, target_ids=ids)
    return {
        "itc": XMREval(batches(pixels=rows, product_ids=ids, subcategory=ids * 0), texts, []),
        "tgir": TGIREval({"dress": TGIRCategoryEval("dress", queries, batches(pixels=rows, target_ids=ids))}),
        "scr": SCREval(batches(pixels=torch.full((12, 5), logit), input_ids=zeros, labels=ids % 5)),
        "cap": CapEval(batches(pixels=rows, input_ids=zeros), ["a dress"] * 12),
    }


def _failing(name: str) -> Callable:
    def fail(*args, **kwargs):
        raise ValueError(f"{name} failed")

    return fail


def _scoring_cases(shard: EvalShard) -> dict[str, Callable[[], list]]:
    """Evaluations whose scoring fails in process 0 (a diverged model's NaN SCR logits; an XMR, TGIR or
    FIC scorer that raises), then one that does not: every process runs them in this order."""
    model, sets, full = _TaskStub(), _hand_made_sets(), EvalOptions(xmr_protocols=("full",))
    diverged = _hand_made_sets(logit=float("nan"))["scr"]

    def failing(task: str, scorer: str) -> Callable[[], list]:
        def evaluate() -> list:
            with mock.patch.object(runner, scorer, _failing(scorer)):
                return runner.EVALUATORS[task](model, sets[task], full, shard)

        return evaluate

    def report(tasks: dict, options: EvalOptions) -> Callable[[], list]:
        return lambda: Evaluator(tasks, options, shard).report(model).results

    capped = EvalOptions(xmr_protocols=("full",), max_samples=6)
    return {
        "scr": lambda: runner.evaluate_scr(model, diverged, full, shard),
        "itc": failing("itc", "xmr_full"),
        "tgir": failing("tgir", "unique_gallery"),
        "cap": failing("cap", "fic_result"),
        "report": report({"scr": diverged, "itc": sets["itc"]}, full),
        "report_capped": report({"scr": diverged, "itc": sets["itc"]}, capped),
        "after": report({"itc": sets["itc"], "scr": sets["scr"]}, full),
    }


def _outcome(fn: Callable[[], list]) -> dict:
    """What ``fn()`` did in this process: the error it raised (class name and message) or how many
    results it returned; and how long it took."""
    start = time.monotonic()
    try:
        done: dict = {"results": len(fn())}
    except Exception as exc:
        done = {"error": [type(exc).__name__, str(exc)]}
    return {**done, "seconds": time.monotonic() - start}


def _scoring_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    join_as_torchrun(rank, world, port)
    # a process left waiting on a collective fails within 30 s: a regression fails rather than hangs
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    shard = EvalShard.of_process_group()
    outcomes = {name: _outcome(case) for name, case in _scoring_cases(shard).items()}
    with open(f"{out}/scoring{rank}.json", "w") as f:
        json.dump(outcomes, f)
    leave_process_group()


@pytest.fixture(scope="module")
def scoring_failures(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("scoring")
    mp.spawn(_scoring_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"scoring{rank}.json").read_text()) for rank in range(2)]


SCORING_ERRORS = {
    "scr": "scr_result: logits contain NaN or Inf",
    "itc": "xmr_full failed",
    "tgir": "unique_gallery failed",
    "cap": "fic_result failed",
}


@pytest.mark.slow
@pytest.mark.parametrize("task", SCORING_ERRORS)
def test_a_failure_while_process_0_scores_is_raised_in_every_process(scoring_failures, task):
    main, other = (outcomes[task] for outcomes in scoring_failures)
    assert main["error"] == ["ValueError", SCORING_ERRORS[task]]
    assert other["error"] == ["ValueError", f"{SCORING_ERRORS[task]} (in process 0 of 2)"]
    assert main["seconds"] < 10 and other["seconds"] < 10  # at once, not after a collective's timeout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["report", "report_capped"])
def test_a_report_whose_first_task_fails_to_score_leaves_every_process_in_step(scoring_failures, case):
    """The SCR task's scoring fails in process 0: every process stops there, before the XMR task, also when
    process 0 evaluates alone (``max_samples``); the next report then runs in step."""
    main, other = (outcomes[case] for outcomes in scoring_failures)
    assert main["error"] == ["ValueError", SCORING_ERRORS["scr"]]
    assert other["error"] == ["ValueError", f"{SCORING_ERRORS['scr']} (in process 0 of 2)"]
    assert main["seconds"] < 10 and other["seconds"] < 10
    assert [outcomes["after"].get("results") for outcomes in scoring_failures] == [2, 0]
