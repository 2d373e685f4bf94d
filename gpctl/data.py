"""`gpctl data get cifar5m`: download CIFAR-5m's parts, resumable and checked (engine/data/fetch.py).
`gpctl data prepare c4`: tokenize a text corpus once into uint16 shards (engine/data/tokens.py), so
training reads tokens through a memory map instead of tokenizing on its training thread."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from gpctl.common import err, friendly, out

app = typer.Typer(no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Get, check and prepare data sets.")


@app.command("prepare", epilog="Example: gpctl data prepare c4 --path ~/data/c4 --tokenizer gpt2 --out ~/data/c4-gpt2"
             "   (or: gpctl data prepare imagenet --path ~/data/imagenet --out ~/data/imagenet-256)")
@friendly
def prepare_cmd(
    corpus: Annotated[str, typer.Argument(metavar="CORPUS", help="c4 (local shards or the hub's) or imagenet "
                                          "(train/ and val/ class folders of JPEGs).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the shards and meta.json (created).")],
    path: Annotated[Optional[Path], typer.Option("--path", help="Folder of c4-{train,validation}.*.json.gz "
                                                 "shards; omitted: stream --hf-name from the hub.")] = None,
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="Hub id or local folder of a GPT-2 BPE tokenizer "
                                           "(the config's data.tokenizer).")] = "gpt2",
    hf_name: Annotated[str, typer.Option("--hf-name", help="Hub data set when --path is omitted.")] = "allenai/c4",
    hf_config: Annotated[str, typer.Option("--hf-config", help="Its configuration.")] = "en",
    splits: Annotated[str, typer.Option("--splits", help="Comma-separated splits to prepare.")] = "train,validation",
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", help="Tokens per shard file.")] = 100_000_000,
    max_docs: Annotated[int, typer.Option("--max-docs", help="Stop each split after this many documents "
                                          "(0: all).")] = 0,
    size: Annotated[int, typer.Option("--size", help="imagenet: pixels; every image resized to SIZE×SIZE "
                                      "(App. A.2: 256; runs read it with data.resize = SIZE).")] = 256,
    shard_images: Annotated[int, typer.Option("--shard-images", help="imagenet: images per shard file.")] = 10_000,
    workers: Annotated[int, typer.Option("--workers", help="imagenet: processes (0: every core).")] = 0,
) -> None:
    """Prepare a data set once so that training reads it through a memory map at GPU speed.

    c4: tokenized, in parallel, into flat uint16 shards. Documents are joined with the tokenizer's EOS
    in corpus order, so a run reading the shards sees token for token what it would see tokenizing the
    raw text as it trains (only faster). The shards use llm.c's format; meta.json records the
    tokenizer's fingerprint and runs with another are refused.

    imagenet: every image decoded and resized once to SIZE×SIZE into uint8 shards (class order as
    torchvision's ImageFolder), with exactly the pixels the JPEG path makes, so a run crops the same
    images either way. Interrupted, it resumes shard by shard when run again with the same options.
    """
    from itertools import islice

    if corpus == "imagenet":
        _prepare_imagenet(path, out_dir, size, shard_images, workers, splits)
        return

    from engine.config import DataConfig
    from engine.data.c4 import documents, load_tokenizer
    from engine.data.tokens import is_prepared, prepare, write_meta

    if corpus != "c4":
        raise typer.BadParameter(f"unknown corpus {corpus!r} (known: c4, imagenet)", param_hint="CORPUS")
    if shard_tokens < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--shard-tokens")
    out_dir = out_dir.expanduser()
    if is_prepared(out_dir):
        err.print(f"error: {out_dir}: already holds prepared shards (meta.json); choose another --out", markup=False)
        raise typer.Exit(2)
    if path is not None and not path.expanduser().is_dir():
        err.print(f"error: {path}: no such folder (--path)", markup=False)
        raise typer.Exit(2)
    dc = DataConfig(source="c4", path=str(path.expanduser()) if path else "", hf_name=hf_name,
                    hf_config=hf_config, tokenizer=tokenizer)
    tok = load_tokenizer(tokenizer)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")   # batches spread over every core
    t0, entries = time.perf_counter(), {}
    last = [0.0]

    def progress(split, docs, tokens):
        now = time.perf_counter()
        if now - last[0] > 2 and err.is_terminal:
            last[0] = now
            err.print(f"{split}: {docs} documents, {tokens / 1e6:.1f}M tokens, "
                      f"{tokens / (now - t0) / 1e6:.2f}M tokens/s", markup=False)

    for split in [s.strip() for s in splits.split(",") if s.strip()]:
        docs = documents(dc, split)
        entries[split] = prepare(islice(docs, max_docs) if max_docs else docs, tok, out_dir, split,
                                 shard_tokens=shard_tokens, progress=progress)
        e = entries[split]
        out.print(f"{split}: {e['documents']} documents, {e['tokens']} tokens in {len(e['shards'])} shard(s)",
                  markup=False)
    if not entries.get("train", {}).get("tokens"):
        err.print(f"error: no training text found ({path or hf_name}); nothing written but shards of other splits",
                  markup=False)
        raise typer.Exit(2)
    write_meta(out_dir, tok, tokenizer, str(path) if path else f"{hf_name}/{hf_config}", entries)
    out.print(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s; train on it with "
              f"--set data.source=\"c4\" --set data.path=\"{out_dir}\" --set data.tokenizer=\"{tokenizer}\"",
              markup=False)


def _prepare_imagenet(path: Optional[Path], out_dir: Path, size: int, shard_images: int, workers: int,
                      splits: str) -> None:
    from engine.data.prepared_images import PrepareError, prepare_images
    from gpctl.common import check_int

    if path is None:
        raise typer.BadParameter("imagenet needs --path, the folder holding train/ and val/", param_hint="--path")
    check_int("--size", size, 1, 4096)
    check_int("--shard-images", shard_images, 1, 10_000_000)
    check_int("--workers", workers, 0, 4096)
    chosen = tuple(s.strip() for s in splits.split(",") if s.strip())
    chosen = tuple("val" if s == "validation" else s for s in chosen)   # c4's split name, the default
    t0, last = time.perf_counter(), [0.0]

    def progress(split: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 2 and err.is_terminal:
            last[0] = now
            err.print(f"{done}/{total} images, {done / (now - t0):.0f} images/s", markup=False)

    try:
        meta = prepare_images(path.expanduser(), out_dir.expanduser(), size, shard_images, workers, chosen, progress)
    except PrepareError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(2) from None
    except OSError as e:       # the folder cannot be made or written, or the disk filled up
        err.print(f"error: {e.filename or out_dir}: {e.strerror}", markup=False)
        raise typer.Exit(2) from None
    took = time.perf_counter() - t0
    n = sum(e["count"] for e in meta["splits"].values())
    for split, e in meta["splits"].items():
        out.print(f"{split}: {e['count']} images of {len(meta['classes'])} classes in {len(e['shards'])} shard(s)",
                  markup=False)
    out.print(f"wrote {out_dir} in {took:.1f} s ({n / took:.0f} images/s); train on it with "
              f"--set data.path=\"{out_dir}\" --set data.resize={size}", markup=False)


@app.command("get", epilog="Example: gpctl data get cifar5m --out ~/data/cifar5m --npy")
@friendly
def get_cmd(
    name: Annotated[str, typer.Argument(metavar="DATASET", help="The data set: cifar5m (six parts, ~18 GB).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the parts (created); the config's data.path.")] = Path("~/data/cifar5m"),
    url: Annotated[Optional[str], typer.Option("--url", help="Where part {k} is, {k} the part number "
                                               "($GPCTL_CIFAR5M_URL; default: its authors' release).")] = None,
    parts: Annotated[Optional[str], typer.Option("--parts", help="Only these parts, e.g. 0,5 (default: all six).")] = None,
    npy: Annotated[bool, typer.Option("--npy", help="Also write partK.X.npy / partK.Y.npy, which the loader memory-maps.")] = False,
    retries: Annotated[int, typer.Option("--retries", help="Reconnects in a row before giving up (it resumes where it was).")] = 5,
) -> None:
    """Download a data set's public files: resumable (HTTP ranges; run it again to continue), each
    file checked (its declared size, its zip CRCs, its arrays' shapes, dtypes and labels) before it is
    kept; a part that fails is moved aside as partK.npz.corrupt and named."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from engine.data.fetch import CIFAR5M_PARTS, CIFAR5M_URL, FetchError, get_cifar5m
    from gpctl.common import check_int

    if name != "cifar5m":
        raise typer.BadParameter(f"unknown data set {name!r} (known: cifar5m)", param_hint="DATASET")
    check_int("--retries", retries, 0, 1000)
    chosen = None
    if parts is not None:
        try:
            chosen = [int(k) for k in parts.split(",") if k.strip()]
        except ValueError:
            raise typer.BadParameter(f"expected part numbers like 0,5, got {parts!r}", param_hint="--parts") from None
        if not chosen or any(not 0 <= k < CIFAR5M_PARTS for k in chosen):
            raise typer.BadParameter(f"parts are 0..{CIFAR5M_PARTS - 1}, got {parts!r}", param_hint="--parts")
    url = url or os.environ.get("GPCTL_CIFAR5M_URL") or CIFAR5M_URL
    out_dir = out_dir.expanduser()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(part: str, have: int, total: int | None) -> None:
            if part not in tasks:
                tasks[part] = bar.add_task(part, total=total)
            bar.update(tasks[part], completed=have, total=total)

        try:
            done = get_cifar5m(out_dir, url, chosen, npy, progress, say=lambda line: out.print(line, markup=False),
                               retries=retries)
        except FetchError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(2) from None
        except OSError as e:       # the folder cannot be made or written
            err.print(f"error: {e.filename or out_dir}: {e.strerror}", markup=False)
            raise typer.Exit(2) from None
    out.print(f"{out_dir}: {len(done)} part(s), {sum(done.values())} images; train on it with "
              f"--set data.path=\"{out_dir}\"", markup=False)


@app.command("check", epilog="Example: gpctl data check cifar_bs32_512   (or a folder: gpctl data check ~/data/cifar5m)")
@friendly
def check_cmd(
    what: Annotated[str, typer.Argument(metavar="PRESET|DIR", help="A preset (its arms' data) or a data folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Plain JSON.")] = False,
) -> None:
    """What data a preset needs and whether it is there (its size, and how much of it each arm draws),
    or what a folder holds (CIFAR-5m parts checked one by one, prepared token shards counted). Exit 1
    when something is missing or fails its check."""
    from rich.table import Table

    from engine.plan import plan
    from engine.presets import load_preset
    from gpctl.common import print_json
    from gpctl.presetcheck import _si
    from gpctl.runs import data_status

    folder = Path(what).expanduser()
    if folder.is_dir():
        rows = _check_folder(folder)
        if as_json:
            print_json(rows)
        else:
            for r in rows:
                out.print(f"{r['file']}: {r['problem'] or r['holds']}", markup=False)
        if not rows or any(r["problem"] for r in rows):
            if not rows:
                err.print(f"error: {folder}: no CIFAR-5m parts (part*.npz) and no prepared shards (meta.json)", markup=False)
            raise typer.Exit(1)
        return
    preset = load_preset(what, check=False)
    rows = []
    for cfg in preset.configs(check=False):
        st, pl = data_status(cfg), plan(cfg)
        rows.append({"arm": cfg.name, **st, "draws": pl.samples, "unit": "tokens" if cfg.is_lm else "samples",
                     "epochs": pl.epochs, "of": pl.data_size, "note": pl.data_note})
    if as_json:
        print_json(rows)
    else:
        for (source, path), group in _by_data(rows).items():   # each data set once: where, there or not, size
            r = group[0]
            where = "" if source.startswith("synthetic") else f" at {path}"
            state = ("generated as it trains, nothing to download" if source.startswith("synthetic") else
                     f"MISSING: {r['missing']}" if r["missing"] else f"there, {_si(r['bytes'])}B on disk")
            size = f"; {_si(r['of'])} {r['unit']} to draw from ({r['note']})" if r["of"] is not None else ""
            out.print(f"{source}{where}: {state}{size}", markup=False)
        t = Table(title=f"{preset.name}: what each arm draws", title_justify="left")
        for col in ("arm", "source", "draws", "epochs", "of"):
            t.add_column(col, justify="right" if col in ("draws", "epochs") else "left", overflow="fold")
        for r in rows:
            t.add_row(r["arm"], r["source"], _si(r["draws"]) + (" tok" if r["unit"] == "tokens" else ""),
                      "endless" if r["epochs"] is None else f"{r['epochs']:.3g}",
                      "-" if r["of"] is None else _si(r["of"]))
        out.print(t)
    if any(r["missing"] for r in rows):
        raise typer.Exit(1)


def _by_data(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["path"]), []).append(r)
    return groups


def _check_folder(folder: Path) -> list[dict]:
    """Each CIFAR-5m part in `folder` checked (engine/data/fetch.py), or its prepared shards' tokens."""
    from engine.data.fetch import FetchError, check_cifar5m_part
    from engine.data.tokens import is_prepared, read_meta
    from engine.errors import DataMissing

    rows = []
    for p in sorted(folder.glob("part*.npz")):
        try:
            rows.append({"file": str(p), "holds": f"{check_cifar5m_part(p)} images", "problem": None})
        except FetchError as e:
            rows.append({"file": str(p), "holds": None, "problem": str(e).removeprefix(f"{p}: ")})
    from engine.data.prepared_images import is_prepared_images
    if is_prepared_images(folder):
        rows.append(_check_prepared_images(folder))
    elif is_prepared(folder):
        try:
            meta = read_meta(folder)
            holds = ", ".join(f"{split} {e.get('tokens', 0):,} tokens" for split, e in meta["splits"].items())
            rows.append({"file": str(folder / "meta.json"), "holds": f"prepared shards ({meta.get('tokenizer', '?')}): {holds}",
                         "problem": None})
        except DataMissing as e:
            rows.append({"file": str(folder / "meta.json"), "holds": None, "problem": str(e)})
    return rows


def _check_prepared_images(folder: Path) -> dict:
    """A prepared ImageNet: meta.json, then every shard's header and shape and the labels."""
    from engine.data.prepared_images import PreparedImages, read_meta
    from engine.errors import DataMissing

    where = str(folder / "meta.json")
    try:
        meta = read_meta(folder)
        counts = []
        for split in meta["splits"]:
            counts.append(f"{split} {PreparedImages(folder, split, meta, threads=1).length:,} images")
    except DataMissing as e:
        return {"file": where, "holds": None, "problem": str(e)}
    return {"file": where, "holds": f"prepared ImageNet {meta['size']}×{meta['size']}, {len(meta['classes'])} classes: "
                                    + ", ".join(counts), "problem": None}


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data", rich_help_panel="Run")
