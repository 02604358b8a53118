"""`gan-job export`: a trained EMA generator as one file that a Python with only torch loads and
runs (TorchScript .pt, torch.export .pt2; ONNX .onnx with onnx and onnxscript installed), and a
model card beside it (FILE.card.json and FILE.card.md, the same facts)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from job.gan.models import Arch
from job.infra.errors import CheckpointError, SettingsError
from job.infra.secrets import redact, redact_values
from job.infra.store import Store
from job.infra.stores import open_store
from job.run import checkpoint, outputs
from job.run.generator_file import BEST_EXPORT, read_config, read_pt, rebuild, what_it_is

FORMATS = {".pt": "torchscript", ".pt2": "torch.export", ".onnx": "onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript")
EXPECTED = "gan-job checkpoint or generator export (final/ or best/generator.pt)"
CHECKPOINT_FOLDER = re.compile(r"/checkpoints/step-\d{8,}$")
EXPORT_FILE = re.compile(r"/(final|best)/generator\.pt$")
CARD_SUFFIXES = (".card.json", ".card.md")


@dataclass
class Source:
    """What is exported: the state of a checkpoint or generator export, and its run folder."""

    uri: str
    state: dict
    run: Store | None  # for config.json, eval.jsonl and metrics.jsonl; None: not in a run


def locate(uri: str, endpoint_url: str | None, which: str) -> Source:
    """The checkpoint or export that `gan-job export URI --which WHICH` means, as
    generator_file.load_generator reads it: a .pt file; a run folder's best/generator.pt (best),
    or its newest checkpoint, else final/generator.pt (final); a checkpoint folder."""
    uri = uri.rstrip("/")
    if uri.endswith(".pt"):
        return Source(uri, _read_pt(uri, endpoint_url), _run_of(uri, endpoint_url))
    store = open_store(uri, endpoint_url)
    if which == "best" and not CHECKPOINT_FOLDER.search(uri):
        if not store.exists(BEST_EXPORT):
            raise CheckpointError(
                f"{uri}: no {BEST_EXPORT} (a run keeps one only when it is evaluated: "
                "GAN_FID_FEATURES); --which final exports its newest checkpoint"
            )
        return locate(f"{uri}/{BEST_EXPORT}", endpoint_url, which)
    found = checkpoint.load_from(uri, endpoint_url)
    if found is not None:
        return Source(uri, found[1], _run_of(uri, endpoint_url))
    if not store.exists("final/generator.pt"):
        raise CheckpointError(f"{uri}: no complete checkpoint or final/generator.pt")
    return locate(f"{uri}/final/generator.pt", endpoint_url, which)


def _read_pt(uri: str, endpoint_url: str | None) -> dict:
    state = read_pt(uri, endpoint_url, uri, EXPECTED)
    if not isinstance(state, dict):
        raise CheckpointError(f"{uri}: {what_it_is(state)}, not a {EXPECTED}")
    return state


def _run_of(uri: str, endpoint_url: str | None) -> Store | None:
    """The run folder of a run, checkpoint folder or final/ or best/ export, if it has a
    config.json."""
    m = CHECKPOINT_FOLDER.search(uri) or EXPORT_FILE.search(uri)
    if m is None and uri.endswith(".pt"):
        return None
    run = open_store(uri[: m.start()] if m else uri, endpoint_url)
    return run if run.exists("config.json") else None


def generator(source: Source) -> tuple[nn.Module, Arch]:
    """The EMA generator in eval mode, float32 on the CPU; CheckpointError when the state has
    none or its weights do not fit its architecture."""
    g, arch = rebuild(source.state, source.uri, EXPECTED)
    return g.float(), arch


class Images(nn.Module):
    """z (N x latent_dim float32) -> images N x C x H x W float32 in [0, 1]."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.g(z, None) + 1) / 2).clamp(0, 1)


class ClassImages(nn.Module):
    """z (N x latent_dim float32), labels (N int64) -> images N x C x H x W float32 in [0, 1]."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ((self.g(z, labels) + 1) / 2).clamp(0, 1)


def image_module(g: nn.Module, arch: Arch) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The generator wrapped to take the exported inputs, and example inputs (a batch of 2)."""
    z = torch.randn(2, arch.latent_dim, generator=torch.Generator().manual_seed(0))
    if arch.num_classes:
        return ClassImages(g).eval(), (z, torch.arange(2) % arch.num_classes)
    return Images(g).eval(), (z,)


def serialize(g: nn.Module, arch: Arch, fmt: str) -> bytes:
    """The file's bytes: the wrapped generator traced (torchscript) or exported (torch.export,
    onnx), its batch size left free."""
    module, example = image_module(g, arch)
    names = ["z", "labels"][: len(example)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated (docs)
        return SERIALIZERS[fmt](module, example, names)


def _torchscript(module: nn.Module, example: tuple, names: list[str]) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(module, example), buf)
    return buf.getvalue()


def _torch_export(module: nn.Module, example: tuple, names: list[str]) -> bytes:
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, example, dynamic_shapes={n: {0: batch} for n in names})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _onnx(module: nn.Module, example: tuple, names: list[str]) -> bytes:
    for name in ("onnxscript", "onnx_ir"):  # their optimizer's INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    batch = torch.export.Dim("batch")
    warnings.filterwarnings("ignore", "# The axis name: batch will not be used", UserWarning)
    program = torch.onnx.export(
        module,
        example,
        input_names=names,
        output_names=["images"],
        dynamic_shapes={n: {0: batch} for n in names},
        dynamo=True,
        verbose=False,
    )
    return program.model_proto.SerializeToString()


SERIALIZERS = {"torchscript": _torchscript, "torch.export": _torch_export, "onnx": _onnx}


def _jsonl_row(run: Store | None, key: str, step: int | None) -> dict | None:
    """The last row of a run's history at this step, if there is one."""
    if run is None or step is None or not run.exists(key):
        return None
    rows = []
    for line in run.get_bytes(key).decode().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a run that was cut off
    return next((r for r in reversed(rows) if isinstance(r, dict) and r.get("step") == step), None)


def _facts(source: Source) -> dict:
    """Step, images seen, scores, settings, run id and training version of what is exported."""
    state = source.state
    is_export = "arch" in state and "g_ema" in state
    saved = {} if is_export else checkpoint.upgrade(state)
    step = state.get("step") if is_export else saved["run"]["step"]
    evaluated = _jsonl_row(source.run, "eval.jsonl", step) or state.get("scores")
    logged = _jsonl_row(source.run, "metrics.jsonl", step) or {}
    config = read_config(source.run) if source.run else {}
    meta = {**config, **saved.get("meta", {})}
    images = saved["run"]["images_seen"] if saved else None
    if images is None:
        images = (evaluated or {}).get("images_seen", logged.get("images_seen"))
    return {
        "step": step,
        "images_seen": images,
        "scores": evaluated,
        "settings": meta.get("settings"),
        "run_id": meta.get("run_id"),
        "trained_with": meta.get("version"),
    }


def gan_job_version() -> str:
    try:
        return importlib.metadata.version("gan-job")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_lines(name: str, arch: Arch, fmt: str) -> str:
    """Three lines of Python that load the file from its folder and draw 16 images."""
    n, latent, classes = 16, arch.latent_dim, arch.num_classes
    if fmt == "onnx":
        feed = f'{{"z": np.random.randn({n}, {latent}).astype(np.float32)'
        feed += f', "labels": np.arange({n}, dtype=np.int64) % {classes}}}' if classes else "}"
        return (
            "import numpy as np, onnxruntime\n"
            f"g = onnxruntime.InferenceSession({name!r})\n"
            f"images = g.run(None, {feed})[0]\n"
        )
    loader = f"torch.jit.load({name!r})"
    if fmt == "torch.export":
        loader = f"torch.export.load({name!r}).module()"
    labels = f", torch.arange({n}) % {classes}" if classes else ""
    return f"import torch\ng = {loader}\nimages = g(torch.randn({n}, {latent}){labels})\n"


def card(source: Source, arch: Arch, out: Path, data: bytes) -> dict:
    """The model card's facts (written as .card.json and .card.md)."""
    fmt = FORMATS[out.suffix]
    facts = _facts(source)
    settings = redact_values(facts["settings"] or {})  # a run's from before redact() knew them
    shape = [arch.channels, arch.image_size, arch.image_size]
    inputs = {"z": f"N x {arch.latent_dim} float32 (standard normal noise)"}
    if arch.num_classes:
        inputs["labels"] = f"N int64 class labels in 0..{arch.num_classes - 1}"
    return {
        "file": out.name,
        "format": fmt,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "source": redact(source.uri),
        "run_id": facts["run_id"],
        "dataset": settings.get("dataset"),
        "image_shape": shape,
        "architecture": dataclasses.asdict(arch),
        "step": facts["step"],
        "images_seen": facts["images_seen"],
        "scores": facts["scores"],
        "inputs": inputs,
        "output": f"images: N x {' x '.join(map(str, shape))} float32 in [0, 1], channels "
        f"first ({'grayscale' if arch.channels == 1 else 'RGB'}); pixels: round(x * 255)",
        "load": load_lines(out.name, arch, fmt),
        "gan_job_version": gan_job_version(),
        "trained_with": facts["trained_with"],
        "torch_version": torch.__version__,
        "settings": settings,
    }


NOT_SCORES = ("step", "images_seen", "extractor", "num_samples", "num_real", "seconds")


def card_markdown(facts: dict) -> str:
    """The card's facts for people."""
    rows = [(k, facts[k]) for k in ("file", "format", "sha256", "bytes", "source", "run_id")]
    rows += [(k, facts[k]) for k in ("dataset", "image_shape", "step", "images_seen")]
    rows += [(f"input {k}", v) for k, v in facts["inputs"].items()]
    rows += [("output", facts["output"])]
    rows += [(k, facts[k]) for k in ("gan_job_version", "trained_with", "torch_version")]
    title = _text(facts["run_id"] or facts["file"])
    lines = [f"# {title}: generator", "", *_table(dict(rows))]
    lines += ["", "## Load", "", "```python", facts["load"].rstrip(), "```", ""]
    lines += ["## Architecture", "", *_table(facts["architecture"]), ""]
    lines += ["## Scores", "", *_scores(facts["scores"]), ""]
    lines += ["## Settings", "", *_table(facts["settings"] or {}), ""]
    return "\n".join(lines)


def _scores(row: dict | None) -> list[str]:
    if not row:
        return ["not evaluated at this step"]
    where = f"with extractor {_code(row.get('extractor'))}, "
    where += f"N = {_text(row.get('num_samples'))} generated"
    where += f", {_text(row.get('num_real'))} real" if "num_real" in row else ""
    return [where, "", *_table({k: v for k, v in row.items() if k not in NOT_SCORES})]


def _table(values: dict) -> list[str]:
    """Two columns; a cell's pipes escaped (GFM splits the row before it reads code spans)."""
    cells = ((_text(k), _code(v).replace("|", "\\|")) for k, v in values.items())
    return ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in cells)]


def _code(value: object) -> str:
    """A value (a path, a run id, a setting: the user's) as inline code, which shows HTML and
    Markdown as they are: on one line, fenced by more backticks than it holds, padded with a
    space (which Markdown strips) where it begins or ends with a backtick or a space."""
    text = _one_line(value if isinstance(value, str) else json.dumps(value))
    if not text:
        return ""
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _text(value: object) -> str:
    """A value as plain Markdown text: on one line, every ASCII punctuation character
    backslash-escaped (no emphasis, link, HTML, entity or table cell can begin there)."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", _one_line(str(value)))


def _one_line(text: str) -> str:
    """Line breaks shown as \\n and \\r: one would end a heading or a table row."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def card_paths(out: Path) -> tuple[Path, Path]:
    """FILE.card.json, FILE.card.md: g.pt and g.pt2 in one folder keep a card each."""
    return tuple(out.with_name(out.name + suffix) for suffix in CARD_SUFFIXES)


def check_out(uri: str) -> list[str]:
    """What is wrong with --out (a path or s3:// URI), before any work. A missing folder is
    created later."""
    out = Path(uri)
    if out.suffix not in FORMATS:
        return [f"--out {out}: expected a file name ending in {', '.join(FORMATS)}"]
    if out.is_dir():
        return [f"--out {out}: is a folder: expected a file name"]
    missing = [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if out.suffix == ".onnx" and missing:
        return [
            f"--out {out}: ONNX needs the {' and '.join(missing)} package(s), not installed: "
            f"pip install {' '.join(missing)}, or write a .pt (TorchScript) or .pt2 (torch.export)"
        ]
    return outputs.out_file_problems(uri)


def write_all(files: dict[Path, bytes]) -> None:
    """Each file written to a temporary file beside it, all renamed once every one is
    written: none is left half written (outputs.replacing)."""
    with contextlib.ExitStack() as stack:
        for path, data in files.items():
            stack.enter_context(outputs.replacing(path)).write(data)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gan-job export", description=__doc__)
    parser.add_argument(
        "source",
        metavar="RUN|CHECKPOINT",
        help="run folder/URI, checkpoint folder, or a .pt generator export "
        "(final/ or best/generator.pt)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="the file: .pt (TorchScript), .pt2 (torch.export) or .onnx; "
        "its card beside it: FILE.card.json, FILE.card.md",
    )
    parser.add_argument(
        "--which",
        choices=("final", "best"),
        default="final",
        help="of a run folder: its newest checkpoint (else final/generator.pt), "
        "or best/generator.pt, the best evaluated step",
    )
    args = parser.parse_args(argv)
    if problems := check_out(args.out):
        raise SettingsError(problems)
    endpoint = os.environ.get("GAN_S3_ENDPOINT_URL") or None
    source = locate(args.source, endpoint, args.which)
    g, arch = generator(source)
    folder, name = outputs.split(args.out)
    with outputs.local_folder(folder, endpoint) as local:
        out = local / name
        data = serialize(g, arch, FORMATS[out.suffix])
        facts = card(source, arch, out, data)
        as_json, as_md = card_paths(out)
        texts = {as_json: json.dumps(facts, indent=2) + "\n", as_md: card_markdown(facts)}
        write_all({out: data, **{p: t.encode() for p, t in texts.items()}})
    print(
        f"wrote {args.out} ({facts['format']}, sha256 {facts['sha256']}), {as_json.name}, "
        f"{as_md.name}"
    )
    return 0
