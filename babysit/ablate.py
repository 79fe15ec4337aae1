"""`babysit ablate`: one run per variant of a base spec, then seed 000's table from storage.

A config is a run's usual TOML (the base spec) plus an ``[ablation]`` table and a list of
``[[variants]]``::

    [ablation]
    name = "alexnet-ablation"   # runs are <name>/<variant>; default: the config file's stem
    mode = "final"              # "final": only the final training, at `params` (seed 000);
                                # "full": the whole five-stage protocol per variant
    params = {lr = 1e-4, weight_decay = 5e-4}   # mode "final" only; a variant may override
    repeats = 1                 # seeded repeats per variant, for the spread

    [[variants]]
    name = "4-conv"                          # letters, digits, - _ . +
    set = {"model.conv_layers" = 4}          # overrides, keyed as --set spells them
    description = "4 conv layers"            # optional: the table's "change" (default: set)
    reported = 0.73                          # optional: the accuracy a report gave, shown beside

Each variant's spec is: defaults, the base TOML, the command line's ``--set``, then the
variant's ``set`` (the variant's own change wins: it is what the ablation is about).

Repeat 0 of a variant is the run ``<ablation>/<variant>`` at the base seed; repeat k >= 1 is
``<ablation>/<variant>/r<k>`` at seed + k. So raising ``repeats`` from 1 to 3 keeps the
finished run as repeat 0 and adds two. Every run lives in the storage like any other
(``babysit status --name alexnet-ablation/4-conv``), and a rerun skips finished ones.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from babysit import stored
from babysit.artifacts import trial_data
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.record import Param
from babysit.record import trial_attrs
from babysit.spec import Spec
from babysit.spec import apply_set
from babysit.spec import build_spec
from babysit.spec import load_toml
from babysit.spec import validate
from babysit.storage import STAGES
from babysit.storage import Storage
from babysit.terminal import Progress
from babysit.terminal import plural

_MODES = ("final", "full")
_ABLATION_KEYS = ("name", "mode", "params", "repeats")
_VARIANT_KEYS = ("name", "set", "params", "description", "reported")
_PARAM_KEYS = (Param.LR, Param.WEIGHT_DECAY)
# Variant names become study names (<ablation>/<variant>/final) and folder names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class Variant:
    name: str
    change: str
    sets: dict[str, Any]
    params: dict[str, float] | None
    reported: float | None


@dataclass
class Ablation:
    name: str
    mode: str
    repeats: int
    variants: list[Variant]
    # (variant, repeat, spec) for every run, in the order they are trained.
    runs: list[tuple[Variant, int, Spec]]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_name(ablation: str, variant: str, repeat: int) -> str:
    return f"{ablation}/{variant}" if repeat == 0 else f"{ablation}/{variant}/r{repeat}"


# ---------------------------------------------------------------------------- config


def _toml_value(value: Any) -> str:
    """A value as a TOML literal, so a variant's override goes through --set's own parser."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, int) else _toml_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
            + "}"
        )
    raise UsageError(f"cannot use {value!r} as a config value")


def _toml_float(value: float) -> str:
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _table_valued_keys() -> set[str]:
    """Keys whose value is itself a table (overfit.lrs): a variant sets them whole."""
    spec = Spec()
    out: set[str] = set()
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            out.update(
                f"{f.name}.{g.name}"
                for g in dataclasses.fields(value)
                if isinstance(getattr(value, g.name), dict)
            )
    return out


def _flatten_sets(table: dict[str, Any], whole: set[str], prefix: str = "") -> dict[str, Any]:
    """``{"model.conv_layers" = 4}`` and ``{model.conv_layers = 4}`` (which TOML reads as
    ``{model = {conv_layers = 4}}``) both become ``{"model.conv_layers": 4}``; a
    table-valued key (overfit.lrs) stays whole."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full not in whole:
            flat.update(_flatten_sets(value, whole, prefix=f"{full}."))
        else:
            flat[full] = value
    return flat


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else _toml_value(value)


def _params(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or set(raw) != set(_PARAM_KEYS):
        raise UsageError(
            f"{where} must be a table with exactly lr and weight_decay, "
            f"like {{lr = 1e-4, weight_decay = 5e-4}}; got {raw!r}"
        )
    out: dict[str, float] = {}
    for key in _PARAM_KEYS:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise UsageError(f"{where}.{key} must be a positive number, got {value!r}")
        out[key] = float(value)
    return out


def _check_keys(table: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise UsageError(
            f"unknown key '{unknown[0]}' in {where}; known keys: {', '.join(allowed)}"
        )


def load_ablation(config: Path, sets: list[str] | tuple[str, ...] = ()) -> Ablation:
    """Read and check the whole config, every variant's spec included, before anything
    trains: a typo in the last variant is an exit-2 error now, not after hours."""
    data = load_toml(config)
    table = data.get("ablation", {})
    if not isinstance(table, dict):
        raise UsageError(f"{config}: [ablation] must be a table")
    _check_keys(table, _ABLATION_KEYS, "[ablation]")
    base = build_spec(config, sets)
    name = table.get("name", base.name or config.stem)
    if not isinstance(name, str) or not all(_NAME.match(p) for p in name.split("/")):
        raise UsageError(f"ablation.name must be letters, digits, - _ . + (and /), got {name!r}")
    mode = table.get("mode", "final")
    if mode not in _MODES:
        raise UsageError(f"ablation.mode must be one of {', '.join(_MODES)}, got {mode!r}")
    repeats = table.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UsageError(f"ablation.repeats must be a whole number >= 1, got {repeats!r}")
    if mode == "final":
        if "params" not in table:
            raise UsageError(
                "ablation.mode 'final' trains at fixed parameters: give "
                "ablation.params = {lr = ..., weight_decay = ...}"
            )
        default_params: dict[str, float] | None = _params(table["params"], "ablation.params")
    else:
        if "params" in table:
            raise UsageError("ablation.params is for mode 'final'; mode 'full' searches them")
        default_params = None

    raw_variants = data.get("variants")
    if not raw_variants:
        raise UsageError(
            f"{config} has no variants: add [[variants]] entries, each with a "
            'name and a set = {"model.conv_layers" = 4} table'
        )
    if not isinstance(raw_variants, list) or not all(isinstance(v, dict) for v in raw_variants):
        raise UsageError(f"{config}: variants must be [[variants]] tables")
    whole = _table_valued_keys()
    variants: list[Variant] = []
    runs: list[tuple[Variant, int, Spec]] = []
    for i, raw in enumerate(raw_variants, 1):
        vname = raw.get("name")
        where = f"variant '{vname}'" if isinstance(vname, str) else f"variant #{i}"
        _check_keys(raw, _VARIANT_KEYS, where)
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise UsageError(
                f"{where} needs a name of letters, digits, - _ . + "
                f"(it names the run {name}/<name>), got {vname!r}"
            )
        if any(v.name == vname for v in variants):
            raise UsageError(f"two variants are named '{vname}'")
        raw_set = raw.get("set", {})
        if not isinstance(raw_set, dict):
            raise UsageError(f'{where}: set must be a table like {{"model.conv_layers" = 4}}')
        overrides = _flatten_sets(raw_set, whole)
        if "name" in overrides:
            raise UsageError(f"{where}: set cannot change the run name; it is {name}/{vname}")
        params = default_params
        if "params" in raw:
            if mode != "final":
                raise UsageError(f"{where}: params is for mode 'final'")
            params = _params(raw["params"], f"{where} params")
        reported = raw.get("reported")
        if reported is not None and (
            isinstance(reported, bool) or not isinstance(reported, (int, float))
        ):
            raise UsageError(f"{where}: reported must be a number (an accuracy), got {reported!r}")
        description = raw.get("description")
        if description is not None and not isinstance(description, str):
            raise UsageError(f"{where}: description must be a string")
        change = description or (
            ", ".join(f"{k}={_shown(v)}" for k, v in overrides.items()) or "baseline"
        )
        variant = Variant(
            vname, change, overrides, params, None if reported is None else float(reported)
        )
        variants.append(variant)
        for k in range(repeats):
            spec = build_spec(config, sets)
            for key, value in overrides.items():
                try:
                    apply_set(spec, f"{key}={_toml_value(value)}")
                except UsageError as err:
                    raise UsageError(f"{where}: {err}") from None
            try:
                validate(spec)
            except UsageError as err:
                raise UsageError(f"{where}: {err}") from None
            spec.name = run_name(name, vname, k)
            spec.seed = base.seed + k
            runs.append((variant, k, spec))
    return Ablation(name, mode, repeats, variants, runs)


# ---------------------------------------------------------------------------- running


def _finished(storage: Storage, run: str) -> bool:
    return bool(stored.load_stage(storage, run, "final").complete)


def _train(
    ablation: Ablation,
    variant: Variant,
    spec: Spec,
    storage: Storage,
    device: str,
    data_dir: str | None,
    quiet: bool,
) -> None:
    """One run: the final training at fixed params, or the whole protocol."""
    from babysit.distributed import launch_final
    from babysit.final import final
    from babysit.protocol import prepare
    from babysit.protocol import record_data_facts
    from babysit.protocol import run_protocol
    from babysit.report import publish_stage

    ctx = prepare(spec, storage, device=device, data_dir=data_dir, quiet=quiet)
    if ablation.mode == "full":
        run_protocol(ctx)
        return
    record_data_facts(ctx)
    bar = Progress(spec.name, "epoch", quiet)
    try:
        result = final(ctx, progress=bar.to, params=variant.params, launch=launch_final)
    finally:
        bar.close()
    publish_stage(ctx, result)
    if result.status == "failed":
        raise ProtocolError(result.verdict)
    if result.status == "skipped":
        _log(f"{spec.name}: {result.verdict}")


def run_ablation(
    config: Path,
    storage: Storage,
    sets: list[str] | tuple[str, ...] = (),
    device: str = "auto",
    data_dir: str | None = None,
    out: Path | None = None,
    quiet: bool = False,
) -> int:
    """Train every variant not yet finished, then print and write the table. Exit code:
    0 when every run finished, 1 when one failed (its row says why)."""
    from babysit.coordination import check_spec

    ablation = load_ablation(Path(config), sets)
    for _, _, spec in ablation.runs:
        check_spec(storage, spec)
    n = len(ablation.runs)
    _log(
        f"ablation {ablation.name}: {plural(len(ablation.variants), 'variant')} x "
        f"{plural(ablation.repeats, 'repeat')}, mode {ablation.mode}, storage {storage.shown}"
    )
    failed: list[str] = []
    for i, (variant, _, spec) in enumerate(ablation.runs, 1):
        label = f"[{i}/{n}] {spec.name}"
        if _finished(storage, spec.name):
            _log(f"{label}: finished earlier, skipped")
            continue
        _log(f"{label}: {variant.change}")
        try:
            _train(ablation, variant, spec, storage, device, data_dir, quiet)
        except ProtocolError as err:
            _log(f"{label} failed: {err}")
            failed.append(spec.name)
    rows = table_rows(storage, ablation)
    markdown = table_markdown(rows, ablation)
    print(markdown, flush=True)
    folder = Path(out) if out is not None else Path(f"ablation-{ablation.name.replace('/', '-')}")
    paths = write_table(rows, markdown, folder)
    _log(f"table: {', '.join(str(p) for p in paths)}")
    incomplete = [r["variant"] for r in rows if r["runs_done"] < r["runs"]]
    return 1 if failed or incomplete else 0


# ---------------------------------------------------------------------------- the table


def _run_facts(storage: Storage, run: str) -> dict[str, Any] | None:
    """Test accuracy and loss, params, epochs and seconds of one run, from storage."""
    stages = stored.load_run(storage, run)
    final = stages["final"]
    if final.study is None:
        return _earlier_failure(storage, run, stages)
    seconds = sum(
        float(trial_attrs(t).seconds or 0.0) for rec in stages.values() for t in rec.trials
    )
    if not final.complete:
        reasons = [v for v in (trial_attrs(t).verdict for t in final.trials) if v]
        return {
            "done": False,
            "status": f"failed: {reasons[-1]}" if reasons else "not finished",
            "seconds": seconds,
        }
    t = final.complete[0]
    a = trial_data(storage, t)  # the readings are an artifact
    return {
        "done": True,
        "status": "done",
        "params": dict(t.params),
        "test_accuracy": a.test_accuracy,
        "test_loss": a.test_loss,
        "val_accuracy": a.val_accuracy,
        "epochs": a.epochs_run,
        "seconds": seconds,
        "readings": list(a.readings or []),
        "epochs_spent": stored.summary(storage, run, stages)["epochs_spent"],
    }


def _earlier_failure(
    storage: Storage, run: str, records: dict[str, stored.StageRecord]
) -> dict[str, Any] | None:
    """Mode "full": a run that stopped before final (sanity or overfit failed) says where."""
    if not any(rec.study is not None for rec in records.values()):
        return None
    stages = stored.summary(storage, run, records)["stages"]
    for stage in STAGES:
        if stages[stage].get("status") == "failed":
            verdict = stages[stage].get("verdict") or ""
            return {
                "done": False,
                "status": f"{stage} failed: {verdict}".rstrip(": "),
                "seconds": 0.0,
            }
    return {"done": False, "status": "not finished", "seconds": 0.0}


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def table_rows(storage: Storage, ablation: Ablation) -> list[dict[str, Any]]:
    """One row per variant: means over its finished repeats, the spread of test accuracy
    (sample standard deviation), and the status of any repeat not finished."""
    rows: list[dict[str, Any]] = []
    for variant in ablation.variants:
        names = [spec.name for v, _, spec in ablation.runs if v is variant]
        facts = [(name, _run_facts(storage, name)) for name in names]
        done = [f for _, f in facts if f is not None and f["done"]]
        accs = [f["test_accuracy"] for f in done if f["test_accuracy"] is not None]
        losses = [f["test_loss"] for f in done if f["test_loss"] is not None]
        params = [f["params"] for f in done]
        spent = [f["epochs_spent"] for f in done]
        readings = list(dict.fromkeys(r for f in done for r in f["readings"]))
        problems = [
            f"{name}: {f['status'] if f else 'not run'}"
            for name, f in facts
            if f is None or not f["done"]
        ]
        rows.append(
            {
                "variant": variant.name,
                "change": variant.change,
                "runs": len(names),
                "runs_done": len(done),
                "lr": params[0].get(Param.LR) if params else None,
                "weight_decay": params[0].get(Param.WEIGHT_DECAY) if params else None,
                "same_params": all(p == params[0] for p in params),
                "test_accuracy_mean": _mean(accs),
                "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
                "test_loss_mean": _mean(losses),
                "epochs": _mean([float(f["epochs"]) for f in done if f["epochs"] is not None]),
                "epochs_spent": _mean(spent),
                "seconds_mean": _mean([f["seconds"] for f in done]),
                "reported": variant.reported,
                "status": "done" if not problems else "; ".join(problems),
                "readings": readings,
                "run_names": names,
            }
        )
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f} %"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(rows: list[dict[str, Any]], ablation: Ablation) -> str:
    header = [
        "variant",
        "change",
        "params",
        "test accuracy",
        "test loss",
        "epochs",
        "seconds",
        "reported",
        "readings",
    ]
    if ablation.mode == "full":
        header.insert(6, "epochs spent")
    lines = [
        f"## Ablation {ablation.name} (mode {ablation.mode}, "
        f"{ablation.repeats} repeat{'s' if ablation.repeats > 1 else ''} per variant)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for r in rows:
        if r["lr"] is None:
            params = ""
        else:
            params = f"lr {r['lr']:.3g}, weight_decay {r['weight_decay']:.3g}"
            if not r["same_params"]:
                params += " (repeat 0; the repeats differ)"
        if r["runs_done"] == 0:
            acc = r["status"]
        else:
            acc = _pct(r["test_accuracy_mean"])
            if r["test_accuracy_std"] is not None:
                acc += f" ± {100 * r['test_accuracy_std']:.2f}"
            if r["runs"] > 1 or r["runs_done"] < r["runs"]:
                acc += f" ({r['runs_done']} of {plural(r['runs'], 'run')})"
        cells = [
            r["variant"],
            r["change"],
            params,
            acc,
            _num(r["test_loss_mean"]),
            _num(r["epochs"], ".0f"),
            _num(r["seconds_mean"], ".0f"),
            _pct(r["reported"]),
            "; ".join(r["readings"]),
        ]
        if ablation.mode == "full":
            cells.insert(6, _num(r["epochs_spent"], ".1f"))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


_CSV_FIELDS = (
    "variant",
    "change",
    "runs",
    "runs_done",
    "lr",
    "weight_decay",
    "test_accuracy_mean",
    "test_accuracy_std",
    "test_loss_mean",
    "epochs",
    "epochs_spent",
    "seconds_mean",
    "reported",
    "status",
    "readings",
    "run_names",
)


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {**r, "readings": "; ".join(r["readings"]), "run_names": " ".join(r["run_names"])}
        )
    return buf.getvalue()


def write_table(rows: list[dict[str, Any]], markdown: str, folder: Path) -> list[Path]:
    """ablation.md, ablation.csv and ablation.json in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "ablation.md"
    md.write_text(markdown)
    table = folder / "ablation.csv"
    table.write_text(table_csv(rows))
    js = folder / "ablation.json"
    js.write_text(json.dumps(rows, indent=2))
    return [md, table, js]
