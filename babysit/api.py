"""babysit from Python (a notebook, a script): :func:`run` and :func:`load_run`.

``run`` is ``babysit run`` without the shell: the same spec, the same storage, the same
five stages, the same summary. ``load_run`` opens a stored run for inspection.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from babysit.data import Splits
from babysit.errors import ProtocolError
from babysit.errors import UsageError
from babysit.schema import STAGES
from babysit.schema import Stage
from babysit.spec import Spec
from babysit.storage import Storage

# Spec keys that run() takes under other names, not as **spec fields.
_OWN = {"dataset": "data=", "arch": "model_options="}


def run(
    model: str | Callable[..., Any] = "alexnet",
    data: Any = "digits",
    storage: str | Path | Storage | None = None,
    name: str | None = None,
    *,
    config: str | Path | None = None,
    sets: Sequence[str] = (),
    device: str = "auto",
    data_dir: str | Path | None = None,
    download: bool | None = None,
    offline: bool = False,
    artifact_dir: str | Path | None = None,
    force: bool = False,
    quiet: bool = False,
    jobs: int = 1,
    compile: bool = False,
    model_options: Mapping[str, Any] | None = None,
    data_options: Mapping[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """Babysit ``model`` on ``data``; return the run's summary (the ``--summary-json`` dict).

    ``model``: ``"alexnet"``, ``"module:callable"``, or a Python callable
    ``(num_classes, in_channels, image_size) -> nn.Module``.
    ``data``: a registered name (``"digits"``, ``"imagefolder"`` with ``data_dir``...),
    ``"module:callable"``, a Python callable returning the splits, or the splits themselves
    (babysit's ``Splits``, or ``{"classes", "train", "val", "test"}`` with ``(images,
    labels)`` uint8 tensor pairs or torch Datasets).
    ``download``/``offline``: a published dataset that is missing (FDDB, CIFAR-10) is
    downloaded unless ``offline`` (or ``$BABYSIT_OFFLINE``) says not to; ``download=True``
    fetches it even then, ``download=False`` never.
    ``storage``: an Optuna storage URL, a path to an SQLite file (``"runs.db"``), or an open
    ``Storage``;
    default ``$BABYSIT_STORAGE``, else ``sqlite:///babysit.db`` in the working directory.

    ``**spec``: spec fields by their top-level key, tables as dicts:
    ``coarse={"trials": 4}, final={"epochs": 2}, optimizer="sgd", seed=1``. The two tables
    whose names the arguments above already take are ``model_options`` (TOML's ``[model]``:
    ``{"fc_width": 256}``) and ``data_options`` (TOML's ``[data]``: ``{"patch_size": 16}``).
    ``config`` (a TOML file) and ``sets`` (``["coarse.trials=4"]``, as ``--set``) apply
    first; keyword fields beat them, as flags beat ``--set`` on the command line.

    A Python object that is not importable by ``module:qualname`` (a function defined in the
    notebook, a lambda, a Splits object) is stored in the spec as ``python:<qualname>``: it
    lives only in this process, so ``babysit worker`` elsewhere cannot rebuild the run and
    stops with exit 2 saying so, and ``jobs`` must stay 1. Give an importable
    ``"module:callable"`` for runs that workers should join. A callable whose module can be
    imported (not ``__main__``) is stored as ``module:qualname`` and works everywhere.

    A failed sanity or overfit check raises :class:`~babysit.errors.ProtocolError` with the
    diagnosis; its ``summary`` attribute holds the summary so far (``force=True`` carries
    on). Bad input raises :class:`~babysit.errors.UsageError` before anything is stored.
    Rerunning with the same name and storage resumes, exactly as the command does.
    """
    from babysit.protocol.prepare import prepare
    from babysit.protocol.run import run_protocol
    from babysit.record import stored
    from babysit.refs import PYTHON_PREFIX
    from babysit.spec import build_spec
    from babysit.spec import default_run_name

    for key, arg in _OWN.items():
        if key in spec:
            raise UsageError(f"run() takes '{key}' as {arg}")
    model_ref = _model_ref(model)
    data_ref = _data_ref(data)
    local = [r for r in (model_ref, data_ref) if r.startswith(PYTHON_PREFIX)]
    if local and jobs > 1:
        raise UsageError(
            f"jobs={jobs} starts worker processes, which cannot rebuild the "
            f"Python object(s) {', '.join(local)}; give 'module:callable' "
            "references or use jobs=1"
        )
    if name is None and data_ref.startswith(PYTHON_PREFIX):
        # A study name that reads well in the dashboard: "python-data-3-classes-..." .
        name = default_run_name(
            "python-" + re.sub(r"[^A-Za-z0-9_.]+", "-", data_ref.removeprefix(PYTHON_PREFIX))
        )
    tables = {"arch": model_options, "data": data_options}
    flags = {
        **{k: dict(v) for k, v in tables.items() if v is not None},
        **spec,
        "name": name,
        "dataset": data_ref,
        "model": model_ref,
    }
    built = build_spec(Path(config) if config is not None else None, list(sets), flags)
    if jobs < 1:
        raise UsageError("jobs must be at least 1")
    store = _storage(storage, artifact_dir)
    ctx = prepare(
        built,
        store,
        device=device,
        data_dir=str(data_dir) if data_dir else None,
        download=download,
        offline=offline,
        force=force,
        quiet=quiet,
        compile=compile,
    )
    try:
        return run_protocol(ctx, jobs=jobs)
    except ProtocolError as err:
        err.summary = stored.summary(store, built.name)  # type: ignore[attr-defined]
        raise
    finally:
        close = getattr(ctx.data, "close", None)
        if close is not None:
            close()  # DataLoader workers of the streaming path end with the run


def _model_ref(model: Any) -> str:
    from babysit.refs import register_object

    if isinstance(model, str):
        return model
    if callable(model):
        return register_object(model, "model")
    raise UsageError(
        f"model must be 'alexnet', 'module:callable' or a callable, got {type(model).__name__}"
    )


def _data_ref(data: Any) -> str:
    from babysit.data.streaming import DatasetSplits
    from babysit.data.user import as_splits
    from babysit.refs import PYTHON_PREFIX
    from babysit.refs import hold
    from babysit.refs import register_object

    if isinstance(data, str):
        return data
    if isinstance(data, (Splits, DatasetSplits, Mapping)):
        splits = as_splits("data", data)
        sizes = splits.sizes()
        # The description changes with the data's shape, so a rerun under the same name with
        # other data is refused as a different spec.
        ref = (
            f"{PYTHON_PREFIX}data[{splits.num_classes} classes, {sizes['train']}/"
            f"{sizes['val']}/{sizes['test']}]"
        )
        return hold(ref, lambda: splits)
    if callable(data):
        return register_object(data, "dataset")
    raise UsageError(
        f"data must be a dataset name, 'module:callable', a callable or the "
        f"splits, got {type(data).__name__}"
    )


def _storage(
    storage: str | Path | Storage | None, artifact_dir: str | Path | None, create: bool = True
) -> Storage:
    from babysit.storage import open_storage

    if isinstance(storage, Storage):
        return storage
    if isinstance(storage, str) and "://" not in storage:
        storage = Path(storage)
    if isinstance(storage, Path):
        storage = f"sqlite:///{storage}"
    return open_storage(storage, artifact_dir, create=create)


class Run:
    """A stored run, read from storage alone (see :func:`load_run`)."""

    def __init__(self, name: str, storage: Storage) -> None:
        self.name = name
        self.storage = storage
        self.studies: dict[str, optuna.Study] = {}
        from babysit.record.runs import find_study
        from babysit.record.runs import no_such_run

        for stage in STAGES:
            study = find_study(storage, name, stage)
            if study is not None:
                self.studies[stage] = study
        if not self.studies:
            raise no_such_run(storage, name)

    def __repr__(self) -> str:
        return f"Run({self.name!r}, stages={list(self.studies)}, storage={self.storage.shown!r})"

    @property
    def spec(self) -> Spec:
        from babysit.record import stored

        return stored.stored_spec(self.storage, self.name)

    @property
    def summary(self) -> dict[str, Any]:
        """The same dict as ``--summary-json`` (``wall_seconds`` is None: not stored)."""
        from babysit.record import stored

        return stored.summary(self.storage, self.name)

    @property
    def data(self) -> dict[str, Any]:
        """How the data was loaded: loader path, image geometry, skipped files."""
        from babysit.schema import StudyAttrs

        sanity = self.studies.get(Stage.SANITY)
        return dict(StudyAttrs.from_attrs(sanity.user_attrs).data or {}) if sanity else {}

    @property
    def best_params(self) -> dict[str, float] | None:
        """The final training's parameters, else the best search trial's, else None."""
        from babysit.schema import best_of

        final = self.summary["stages"][Stage.FINAL]
        if final.get("params"):
            return dict(final["params"])
        for stage in (Stage.FINE, Stage.COARSE):
            if stage in self.studies:
                best = best_of(self.studies[stage].get_trials(deepcopy=False))
                if best is not None:
                    return dict(best["params"])
        return None

    def trials_dataframe(self) -> Any:
        """Every trial of every stage, one row each: the table `babysit export` writes (a
        ``stage`` column, one column per meaning such as ``val_accuracy``, native dtypes)."""
        from babysit.report.export import trials_frame

        return trials_frame(self.storage, self.name)

    def model(self) -> Any:
        """The final training's network with its trained weights, on the CPU, in eval mode."""
        import torch

        from babysit.training.models import build_model

        attrs = self.summary["stages"][Stage.FINAL]
        artifact = attrs.get("model_artifact")
        facts = self.data
        if not artifact:
            raise UsageError(
                f"run '{self.name}' has no trained model yet: the final stage is {attrs['status']}"
            )
        if "in_channels" not in facts:
            raise UsageError(
                f"run '{self.name}' predates stored image geometry; rebuild its "
                "network by hand and load the model artifact"
            )
        spec = self.spec
        net = build_model(
            spec.model, self.summary["num_classes"], facts["in_channels"], facts["input_size"]
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            optuna.artifacts.download_artifact(
                artifact_store=self.storage.artifacts, file_path=path, artifact_id=artifact
            )
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()


def load_run(
    name: str, storage: str | Path | Storage | None = None, artifact_dir: str | Path | None = None
) -> Run:
    """Open the stored run ``name``: ``.summary``, ``.spec``, ``.studies`` (stage ->
    optuna.Study), ``.trials_dataframe()``, ``.best_params``, ``.data``, ``.model()``."""
    return Run(name, _storage(storage, artifact_dir, create=False))
