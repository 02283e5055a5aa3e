"""Checkpoints: atomic, per-rank head shards, re-cut by class range on load.

Layout of ``OUTPUT/checkpoints/``::

    step_00000100/
        manifest.json            what the run was (classes, K, D, backbone, world size, position)
        backbone.pt              partialfc-backbone/1 (``partialfc.models.save_backbone``), fp32
        backbone_optimizer.pt    the engine's state (backbone optimizer, schedule, grad scaler) and the
                                 head's optimizer hyper-parameters and schedule (rank 0)
        head_rank00000.pt        one per rank: its class range, center rows and their optimizer rows
        rng_rank00000.pt         one per rank: torch (and CUDA) RNG and the head's sampling stream
    latest                       text: name of the newest complete step directory

Every rank writes its files into ``step_XXXXXXXX.tmp/``; once every rank reports success
rank 0 writes the manifest, renames the directory into place and only then updates
``latest``. A run killed at any point leaves either a complete checkpoint or a ``.tmp``
directory that loading ignores. A write that fails on any rank (a full disk) fails the
save on every rank alike -- no rank is left waiting in a barrier -- and leaves the
previous checkpoints and ``latest`` as they were. A complete step directory is never
removed to be rewritten. Loading uses ``torch.load(weights_only=True)`` only.

A checkpoint is complete when its ``manifest.json`` parses, has this format and every
file it implies exists; ``latest`` is only a hint: ``newest_complete`` takes the newest
complete step directory, and says so when ``latest`` is missing, broken or behind it.

Head rows are stored with their global class range, so a checkpoint written by W ranks
loads onto W' ranks: each new shard copies its rows from whichever old shards overlap.
The backbone's optimizer state is stored as full tensors per parameter, in torch's own
optimizer format, by both engines (DeepSpeed's ZeRO partitions are gathered first, see
``partialfc.distributed.engines``): it too loads on any world size and under either
engine, and nothing in a checkpoint needs unpickling.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from partialfc.atomic_io import atomic_torch_save, atomic_write_text
from partialfc.checkpoint_dirs import (  # noqa: F401  (re-exported: the public checkpoint API)
    FORMAT, CheckpointError, checkpoint_problem, find_latest, newest_complete, resolve_checkpoint, step_dir_name,
    step_dirs, step_of,
)
from partialfc.distributed import collectives

HEAD_FORMAT = "partialfc-head-shard/1"


def _load(path: Path):
    """A checkpoint file, weights-only; CheckpointError with one line saying what is wrong."""
    from partialfc.models.torch_files import read_weights_only

    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return read_weights_only(path, what="checkpoint file")
    except ValueError as exc:  # corrupt, truncated or not a weights-only file
        raise CheckpointError(str(exc)) from None


def read_manifest(path: str | os.PathLike) -> dict:
    step_dir = resolve_checkpoint(path)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{step_dir}/manifest.json: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


# ---------------------------------------------------------------------------- saving
def _head_state(head, head_optimizer) -> dict:
    rows = {}
    state = head_optimizer.state.get(head.weight, {}) if head_optimizer is not None else {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == head.weight.shape[0]:
            rows[key] = value.detach().cpu()
    return {
        "format": HEAD_FORMAT,
        "class_start": head.class_start,
        "num_local": head.num_local,
        "num_classes": head.num_classes,
        "num_subcenters": head.num_subcenters,
        "embedding_size": head.embedding_size,
        "weight": head.weight.detach().cpu(),
        "optimizer_rows": rows,
    }


def _rng_state(head) -> dict:
    state = {"torch": torch.get_rng_state(), "sampler": head.sampler_state().cpu()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(output: str | os.PathLike, *, step: int, position: dict, config_dict: dict,
                    backbone_name: str, backbone_kwargs: dict, backbone_state: dict, head, engine_state: Optional[dict],
                    head_optimizer, head_scheduler=None, keep_last: int = 3) -> Path:
    """Collective: every rank calls it. Returns the final step directory.

    ``backbone_state`` and ``engine_state`` come from the engine's ``backbone_state_dict()``
    and ``state_dict()`` (collective under DeepSpeed, so gathered on every rank before
    this call); only rank 0 writes them. ``engine_state=None`` writes a checkpoint that
    evaluates and exports but cannot resume training.

    A step that already has a complete directory is not written again (the directory is
    returned). Any rank's failure (a full disk) raises CheckpointError on every rank,
    after removing the ``.tmp`` directory; ``latest`` and older checkpoints stay as they were.
    """
    from partialfc.models import save_backbone

    group = head.process_group
    rank, world = collectives.rank(group), collectives.world_size(group)
    device = head.weight.device
    root = Path(output) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    # Rewriting a saved step would first remove the directory `latest` may name; rank 0
    # decides for everyone, so all ranks take the same path through the collectives.
    if gather_ints(rank == 0 and checkpoint_problem(final) is None, group, device)[0]:
        return final

    def prepare() -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a killed run
            tmp.mkdir(parents=True)

    def write_own_files() -> None:
        atomic_torch_save(_head_state(head, head_optimizer), tmp / f"head_rank{rank:05d}.pt")
        atomic_torch_save(_rng_state(head), tmp / f"rng_rank{rank:05d}.pt")
        if rank == 0:
            save_backbone(tmp / "backbone.pt", backbone_name, backbone_kwargs, backbone_state)
            trainer_state = {
                "engine": engine_state,
                "head_optimizer_groups": [{k: v for k, v in g.items() if k != "params"}
                                          for g in head_optimizer.param_groups],
                "head_scheduler": head_scheduler.state_dict() if head_scheduler is not None else None,
            }
            atomic_torch_save(trainer_state, tmp / "backbone_optimizer.pt")

    def publish() -> None:
        if rank != 0:
            return
        manifest = {
            "format": FORMAT,
            "step": step,
            "position": position,
            "world_size": world,
            "num_classes": head.num_classes,
            "num_subcenters": head.num_subcenters,
            "embedding_size": head.embedding_size,
            "backbone": {"name": backbone_name, "kwargs": backbone_kwargs},
            "head_shards": [
                {"file": f"head_rank{r:05d}.pt", **_shard_range(head.num_classes, world, r)}
                for r in range(world)
            ],
            "config": config_dict,
        }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
        if final.exists():  # incomplete (a complete one returned above), so not a checkpoint to keep
            shutil.rmtree(final)
        os.replace(tmp, final)
        try:
            atomic_write_text(root / "latest", final.name + "\n")
        except BaseException:
            if _latest_name(root) != final.name:  # put it back: `latest` still names the previous one
                os.replace(final, tmp)
            raise

    # Each phase ends in one all-gather of "did this rank fail" (in place of a barrier),
    # so a rank that fails never leaves the others waiting for it.
    for phase in (prepare, write_own_files, publish):
        error = None
        try:
            phase()
        except Exception as exc:  # reported to every rank first, raised below
            error = exc
        failed = [r for r, flag in enumerate(gather_ints(error is not None, group, device)) if flag]
        if failed:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None and not isinstance(error, (OSError, ValueError)):
                raise error  # a bug, not the file system: keep its traceback
            raise _save_failure(root, step, failed, error) from error
    if rank == 0:
        _prune(root, keep_last, keep=final)
    return final


def _save_failure(root: Path, step: int, failed: list, error: Optional[Exception]) -> CheckpointError:
    """One line: this rank's own error, or which ranks failed; and what is kept."""
    if error is not None:
        what = str(error)
    elif len(failed) == 1:
        what = f"rank {failed[0]} could not write its checkpoint files"
    else:
        what = f"ranks {', '.join(map(str, failed))} could not write their checkpoint files"
    previous = _latest_name(root)
    kept = f"{root / 'latest'} still names {previous}" if previous else "no earlier checkpoint was touched"
    return CheckpointError(f"checkpoint of step {step} not written: {what}; {kept}")


def _latest_name(root: Path) -> Optional[str]:
    try:
        return (root / "latest").read_text(errors="replace").strip() or None
    except OSError:
        return None


def gather_ints(value: int, group, device) -> list[int]:
    """Every rank's ``value``, in rank order (an all-gather; ``[value]`` without a group).
    How ranks agree on a decision or learn which rank failed, without a barrier to hang in."""
    gathered = collectives.all_gather_no_grad(torch.tensor([int(value)], dtype=torch.int64, device=device), group)
    return gathered.tolist()  # host sync: start-up and checkpointing, not the step


def _shard_range(num_classes: int, world: int, rank: int) -> dict:
    from partialfc.distributed.shards import class_shard

    shard = class_shard(num_classes, world, rank)
    return {"class_start": shard.class_start, "num_local": shard.num_local}


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Remove all but the newest ``keep_last`` step directories; never ``keep`` (the one
    just written, which ``latest`` names)."""
    if keep_last <= 0:
        return
    for old in step_dirs(root)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- loading
def check_compatible(manifest: dict, *, num_classes: int, num_subcenters: int, embedding_size: int,
                     backbone_name: str, where: str = "checkpoint") -> None:
    """Refuse a checkpoint of another model, naming every field that differs."""
    expected = {"num_classes": num_classes, "num_subcenters": num_subcenters,
                "embedding_size": embedding_size, "backbone": backbone_name}
    found = {"num_classes": manifest["num_classes"], "num_subcenters": manifest["num_subcenters"],
             "embedding_size": manifest["embedding_size"], "backbone": manifest["backbone"]["name"]}
    diffs = [f"{k}: checkpoint has {found[k]!r}, config has {expected[k]!r}" for k in expected if found[k] != expected[k]]
    if diffs:
        raise CheckpointError(f"{where} is from another model: " + "; ".join(diffs))


def load_head_rows(step_dir: Path, manifest: dict, class_start: int, num_local: int, num_subcenters: int):
    """Rows ``[class_start, class_start + num_local)`` of the centers and of their optimizer state,
    copied from whichever saved shards overlap (any saved world size)."""
    pieces, state_pieces = [], {}
    end = class_start + num_local
    for shard in manifest["head_shards"]:
        lo, hi = shard["class_start"], shard["class_start"] + shard["num_local"]
        if hi <= class_start or lo >= end:
            continue
        data = _load(step_dir / shard["file"])
        if data.get("format") != HEAD_FORMAT or data["class_start"] != lo:
            raise CheckpointError(f"{step_dir / shard['file']}: not the head shard the manifest describes")
        first, last = (max(lo, class_start) - lo) * num_subcenters, (min(hi, end) - lo) * num_subcenters
        pieces.append(data["weight"][first:last])
        for key, value in data["optimizer_rows"].items():
            state_pieces.setdefault(key, []).append(value[first:last])
    weight = torch.cat(pieces)
    if weight.shape[0] != num_local * num_subcenters:
        raise CheckpointError(f"{step_dir}: head shards do not cover classes [{class_start}, {end})")
    return weight, {k: torch.cat(v) for k, v in state_pieces.items()}


def load_centers(path: str | os.PathLike) -> torch.Tensor:
    """The full center matrix ``(num_classes, K, D)`` gathered from every shard file."""
    step_dir = resolve_checkpoint(path)
    manifest = read_manifest(step_dir)
    weight, _ = load_head_rows(step_dir, manifest, 0, manifest["num_classes"], manifest["num_subcenters"])
    return weight.view(manifest["num_classes"], manifest["num_subcenters"], manifest["embedding_size"])


def load_checkpoint(path: str | os.PathLike, *, engine, head, head_optimizer, head_scheduler=None,
                    backbone_name: str) -> dict:
    """Restore a training state in place (onto any world size, under either engine);
    returns the manifest. ``engine`` is a ``partialfc.distributed.engines`` engine."""
    from partialfc.models.inference import read_backbone_state

    step_dir = resolve_checkpoint(path)
    manifest = read_manifest(step_dir)
    check_compatible(manifest, num_classes=head.num_classes, num_subcenters=head.num_subcenters,
                     embedding_size=head.embedding_size, backbone_name=backbone_name, where=str(step_dir))
    trainer_state = _load(step_dir / "backbone_optimizer.pt")
    if trainer_state.get("engine") is None:
        raise CheckpointError(f"{step_dir} holds no backbone optimizer state (written for evaluation only); "
                              "it cannot resume training")
    engine.load_backbone_state_dict(read_backbone_state(step_dir / "backbone.pt", engine.module))
    try:
        engine.load_state_dict(trainer_state["engine"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{step_dir / 'backbone_optimizer.pt'}: backbone optimizer state does not fit this "
                              f"run: {exc}") from None
    weight, rows = load_head_rows(step_dir, manifest, head.class_start, head.num_local, head.num_subcenters)
    with torch.no_grad():
        head.weight.copy_(weight)
    for group, saved in zip(head_optimizer.param_groups, trainer_state["head_optimizer_groups"]):
        group.update(saved)
    if rows:
        head_optimizer.state[head.weight] = {k: v.to(head.weight.device) for k, v in rows.items()}
    if head_scheduler is not None and trainer_state.get("head_scheduler") is not None:
        head_scheduler.load_state_dict(trainer_state["head_scheduler"])
    rank = collectives.rank(head.process_group)
    rng_file = step_dir / f"rng_rank{rank:05d}.pt"
    if manifest["world_size"] == collectives.world_size(head.process_group) and rng_file.is_file():
        rng = _load(rng_file)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        head.load_sampler_state(rng["sampler"].to(head.sampler_state().device))
    return manifest


# ---------------------------------------------------------------------------- CLI
def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write one file holding the full ``(C, K, D)`` center matrix and the backbone."""
    step_dir = resolve_checkpoint(path)
    manifest = read_manifest(step_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from partialfc.models.inference import CONSOLIDATED_FORMAT

    backbone = _load(step_dir / "backbone.pt")
    atomic_torch_save({
        "format": CONSOLIDATED_FORMAT,
        "step": manifest["step"],
        "num_classes": manifest["num_classes"],
        "num_subcenters": manifest["num_subcenters"],
        "embedding_size": manifest["embedding_size"],
        "centers": load_centers(step_dir),
        "backbone": backbone,
    }, out)
    return out


def main(argv=None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m partialfc.checkpoint",
                                     description="Inspect and convert partialfc checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser("consolidate", help="write one file with the full center matrix (+ backbone)")
    cons.add_argument("checkpoint", help="step directory, checkpoints root or run directory")
    cons.add_argument("out", help="output .pt file")
    info = sub.add_parser("info", help="print the manifest (without the config)")
    info.add_argument("checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.command == "consolidate":
            out = consolidate(args.checkpoint, args.out)
            print(f"wrote {out}")
        else:
            manifest = read_manifest(args.checkpoint)
            manifest.pop("config", None)
            print(json.dumps(manifest, indent=2))
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
