"""Training pieces every bundle shares and MONAI does not ship: EMA weights, crash-safe resumable checkpoints,
strict config overrides, seeding and periodic previews. Each is an ignite handler (``attach(engine)``) so bundle
configs list them in ``train_handlers`` next to MONAI's own."""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .io import load_checkpoint, save_checkpoint

logger = logging.getLogger("brainsynth.engine.training")

CHECKPOINT_LAST = "checkpoint_last.pt"


def seed_everything(seed: int, deterministic: bool | None = None) -> int:
    """Seed python, numpy and torch (all devices), make MONAI transforms deterministic, and choose the kernels.

    ``deterministic`` (the bundles' key of that name; None: true on a machine without CUDA, false with it):
    - true: cuDNN's deterministic convolutions, no autotuning, and on CUDA torch's deterministic algorithms where
      they exist (``warn_only``: CUDA has no deterministic backward for 3D upsampling, ``grid_sample`` or embedding
      gradients, so these still vary in their last bits from run to run). On a CPU a resumed training ends
      bit-identical to an uninterrupted one; on CUDA it continues from the same state, but not bit-identically.
    - false: cuDNN autotunes each convolution shape (``benchmark``), the fast choice for 3D networks on a GPU.
    """
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed=seed)  # also switches cuDNN to deterministic / no autotuning; the setting decides below
    if deterministic is None:
        deterministic = not torch.cuda.is_available()
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if torch.cuda.is_available():
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
        torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    return seed


def is_main_process() -> bool:
    return _rank_and_world()[0] == 0


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DistributedDataParallel / torch.compile wrappers, so weights stay portable."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, torch.nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


class EMAHandler:
    """Exponential moving average of a network's weights.

    Every ``update_every`` iterations: before ``start_step`` the average is reset to the live weights (so early,
    poor weights do not linger), afterwards ``ema <- decay * ema + (1 - decay) * live``. Med-DDPM uses
    decay 0.995, every 10 steps, from step 2000; D3M (its train.json) 0.995 every 10 steps from step 100.
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.995, update_every: int = 10, start_step: int = 2000):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.network = network
        self.decay, self.update_every, self.start_step = decay, update_every, start_step
        self.ema_network = copy.deepcopy(unwrap(network)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        if iteration % self.update_every:
            return
        live = unwrap(self.network).state_dict()
        for name, ema_value in self.ema_network.state_dict().items():
            if not isinstance(ema_value, torch.Tensor):  # extra state (e.g. a vocabulary): nothing to average
                continue
            value = live[name].detach()
            if iteration < self.start_step or not torch.is_floating_point(ema_value):
                ema_value.copy_(value)
            else:
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - self.decay)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.update(e.state.iteration))

    def state_dict(self) -> dict:
        return self.ema_network.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema_network.load_state_dict(state)


class ResumableCheckpoint:
    """Crash-safe training checkpoints that training resumes from automatically.

    ``save_dict`` maps names to objects with ``state_dict``/``load_state_dict`` (network, optimizer, lr scheduler,
    EMAHandler, and the trainer engine itself for its iteration and epoch counters). On start, if
    ``<save_dir>/checkpoint_last.pt`` exists it is loaded (weights_only) and training continues from its epoch;
    every ``save_every`` epochs and at the end it is rewritten atomically (temporary file + rename) by rank 0 only.
    At the end the inference weights (EMA weights when ``final_from`` names an EMA entry) are written to
    ``final_model_path``. One "epoch" is the trainer's ``epoch_length`` iterations, so resuming is exact.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_every: int = 1,
        final_model_path: str | os.PathLike | None = None,
        final_from: str = "network",
        resume: bool = True,
        overwrite: bool = False,
    ):
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_every = int(save_every)
        self.final_model_path = Path(final_model_path) if final_model_path else None
        self.final_from = final_from
        self.resume = resume
        self.overwrite = bool(overwrite)
        self.lock = TrainingLock(self.save_dir)
        self._epoch_end_rng: tuple[int, dict] | None = None
        if final_model_path and final_from not in self.save_dict:
            raise ValueError(f"final_from={final_from!r} is not one of the saved objects {list(self.save_dict)}")

    @property
    def last_path(self) -> Path:
        return self.save_dir / CHECKPOINT_LAST

    def attach(self, engine) -> None:
        from ignite.engine import Events

        accumulation = int(getattr(engine, "accumulation_steps", 1) or 1)
        length = getattr(engine.state, "epoch_length", None)
        if accumulation > 1 and length and (length * self.save_every) % accumulation:
            raise ValueError(
                f"epoch_length {length} x save_every {self.save_every} is not a multiple of accumulation_steps "
                f"{accumulation}: a checkpoint would fall inside an accumulation phase and a resumed training would "
                f"lose its partial gradients; choose an epoch_length that is a multiple of {accumulation}"
            )
        engine.add_event_handler(Events.STARTED, self.lock.acquire)
        engine.add_event_handler(Events.COMPLETED, self.lock.release)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        else:
            engine.add_event_handler(Events.STARTED, lambda _: self._refuse_foreign_final_model())
        # first among the epoch-end handlers, so the random state is taken before any of them draws from it
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._capture_rng)
        handlers = engine._event_handlers[Events.EPOCH_COMPLETED]
        handlers.insert(0, handlers.pop())
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_every), self.save)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    @staticmethod
    def grad_scalers(engine: Any) -> dict[str, Any]:
        """The engine's active mixed-precision loss scalers (MONAI's SupervisedTrainer: ``scaler``; its
        AdversarialTrainer: ``state.g_scaler`` / ``state.d_scaler``): their scale and growth counters are training
        state, so they travel in the checkpoint (a resumed fp16 run would otherwise restart at scale 65536)."""
        found = {}
        state = getattr(engine, "state", None)
        for key, owner, attr in (
            ("grad_scaler", engine, "scaler"),
            ("grad_scaler_generator", state, "g_scaler"),
            ("grad_scaler_discriminator", state, "d_scaler"),
        ):
            scaler = getattr(owner, attr, None)
            if scaler is not None and hasattr(scaler, "is_enabled") and scaler.is_enabled():
                found[key] = scaler
        return found

    def _object_state(self, obj: Any) -> Any:
        if isinstance(obj, torch.nn.Module):
            return unwrap(obj).state_dict()
        return obj.state_dict()

    def load(self, engine) -> None:
        if is_main_process():  # the only writer: another rank could otherwise delete a save in flight
            remove_stale_temporaries(self.save_dir)
        if not self.last_path.is_file():
            self._refuse_foreign_final_model()
            return
        ckpt = load_checkpoint(self.last_path)
        missing = [k for k in self.save_dict if k not in ckpt]
        if missing:
            raise RuntimeError(
                f"{self.last_path}: checkpoint lacks {missing}; it was written by another recipe. "
                f"Move it away or point save_dir elsewhere."
            )
        max_epochs = engine.state.max_epochs
        for name, obj in self.save_dict.items():
            target = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
            target.load_state_dict(ckpt[name])
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise ValueError(
                f"{self.last_path}: checkpoint is at epoch {engine.state.epoch}, beyond max_epochs "
                f"{max_epochs}; raise max_epochs to train further"
            )
        engine.state.max_epochs = max_epochs
        for name, scaler in self.grad_scalers(engine).items():
            if name in ckpt:
                scaler.load_state_dict(ckpt[name])
            else:
                logger.warning(
                    "%s has no %s state (saved without mixed precision): it starts afresh", self.last_path, name
                )
        # the rest of the run replays the uninterrupted one: the random streams as they were at the save, and the
        # data order from the same position (a ResumableRandomSampler continues where the run stopped)
        if "rng" in ckpt:
            rank, world = _rank_and_world()
            per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
            if len(per_rank) == world:
                set_rng_state(per_rank[rank])
            else:
                set_rng_state(ckpt["rng"])
                logger.warning(
                    "%s holds the random states of %d process(es), this run has %d: each continues from rank 0's",
                    self.last_path,
                    len(per_rank),
                    world,
                )
        else:
            logger.warning(
                "%s has no random-number state (written before 0.3.0): the resumed run continues, but "
                "not bit-identically to an uninterrupted one",
                self.last_path,
            )
        _resume_sampler(engine)
        logger.info(
            "resumed from %s at iteration %d (epoch %d)", self.last_path, engine.state.iteration, engine.state.epoch
        )

    def _refuse_foreign_final_model(self) -> None:
        """A fresh training (no checkpoint to resume) would end by replacing weights an earlier training wrote."""
        if self.final_model_path is not None and self.final_model_path.exists() and not self.overwrite:
            raise FileExistsError(
                f"{self.final_model_path}: already exists, written by an earlier training that this one does not "
                f"resume ({self.last_path.name} is absent); set overwrite to true to replace it, or train into "
                f"another bundle_root"
            )

    def save(self, engine) -> None:
        # the random state as it was when the epoch's last iteration ended: work that other handlers do after it
        # (end-of-training statistics, previews) must not move the stream a resumed run continues from
        iteration = engine.state.iteration if engine is not None else None
        if self._epoch_end_rng is None or self._epoch_end_rng[0] != iteration:
            self._capture_rng(engine)
        if not is_main_process():
            return
        per_rank = self._epoch_end_rng[1]
        state = {k: self._object_state(v) for k, v in self.save_dict.items()}
        if engine is not None:
            state.update({k: v.state_dict() for k, v in self.grad_scalers(engine).items()})
        save_checkpoint({**state, "rng": per_rank[0], "rng_per_rank": per_rank}, self.last_path)

    def _capture_rng(self, engine) -> None:
        """Every rank's random state (gathered to all ranks under torch.distributed, so each resumes its own)."""
        state = get_rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, state)
        else:
            per_rank = [state]
        self._epoch_end_rng = (engine.state.iteration if engine is not None else None, per_rank)

    def finish(self, engine) -> None:
        self.save(engine)
        if self.final_model_path is not None and is_main_process():
            save_checkpoint(self._object_state(self.save_dict[self.final_from]), self.final_model_path, record=True)


def _rank_and_world() -> tuple[int, int]:
    from .sharding import rank_and_world  # one definition: torch.distributed's, else torchrun's environment

    return rank_and_world()


class TrainingLock:
    """One training per checkpoint folder: ``<folder>/.training.lock`` names the holder (host, PID, start time).

    A second training there stops before any work, saying who holds the folder; a lock whose process is gone (same
    host) is taken over with a warning. Rank 0 alone holds it under DDP; it is released at the end of training
    and when the process exits."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / ".training.lock"
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self, engine: Any = None) -> None:
        import json
        import socket
        import time

        if not is_main_process() or self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                same_host = holder.get("host") == me["host"]
                if same_host and isinstance(holder.get("pid"), int) and not self._alive(holder["pid"]):
                    logger.warning(
                        "%s: taking over the lock of training PID %s (started %s), which is no longer running",
                        self.path,
                        holder.get("pid"),
                        holder.get("started"),
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise RuntimeError(
                    f"{self.path.parent}: another training is using this checkpoint folder (host "
                    f"{holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {holder.get('started', '?')}); "
                    f"wait for it to finish, or train into another bundle_root"
                    + ("" if same_host else f" (if it is no longer running, delete {self.path})")
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            import atexit

            atexit.register(self.release)
            return

    def release(self, engine: Any = None) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# --- exact resume -------------------------------------------------------------------------------------------
def _numpy_state(state: tuple) -> dict:
    """A numpy MT19937 state (``get_state()``) as weights-only-loadable values."""
    _, keys, pos, has_gauss, cached = state
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    return (
        "MT19937",
        state["keys"].numpy().astype(np.uint32),
        state["pos"],
        state["has_gauss"],
        state["cached_gaussian"],
    )


def get_rng_state() -> dict:
    """The random states of torch (CPU and every CUDA device), numpy and Python, as weights-only-loadable values."""
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(np.random.get_state()),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``get_rng_state`` took. A job resumed with another number of visible GPUs restores the devices
    both have (the first ones); a device it did not have keeps its seed, one it has no more is dropped, and the
    difference is logged (the run continues, not bit-identically)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved, visible = list(state["cuda"]), torch.cuda.device_count()
        if len(saved) != visible:
            logger.warning(
                "the random state was saved with %d visible GPU(s), this run has %d: the first %d are restored",
                len(saved),
                visible,
                min(len(saved), visible),
            )
        for index, device_state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(device_state, index)
    np.random.set_state(_numpy_tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class ResumableRandomSampler(torch.utils.data.Sampler):
    """Shuffled data order that a resumed run can continue exactly.

    Pass ``p`` over the data is the permutation drawn from a generator seeded with ``(seed, p)``: the order depends
    on nothing but the seed and the pass, so after a crash the run restarts at the same pass and position
    (``resume_at``, called by ``ResumableCheckpoint`` with the trainer's iteration) instead of replaying from the
    first batch or reshuffling. Use it as a training DataLoader's ``sampler`` (with ``shuffle`` false).
    """

    def __init__(self, data_source: Any, seed: int = 0):
        self.num_samples = len(data_source)
        self.seed = int(seed)
        self.pass_index, self.offset = 0, 0

    def __len__(self) -> int:
        return self.num_samples

    def order(self, pass_index: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_index)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self):
        pass_index, offset = self.pass_index, self.offset
        self.pass_index, self.offset = pass_index + 1, 0
        return iter(self.order(pass_index)[offset:])

    def resume_at(self, iteration: int, batch_size: int, drop_last: bool = False) -> None:
        """Position the sampler as it was after ``iteration`` batches of ``batch_size`` from the start."""
        per_pass = self.num_samples // batch_size if drop_last else -(-self.num_samples // batch_size)
        self.pass_index, within = divmod(int(iteration), max(per_pass, 1))
        self.offset = within * batch_size


class RandomTransformState:
    """``state_dict`` / ``load_state_dict`` over the random streams of every MONAI ``Randomizable`` inside a
    transform (a Compose is walked), so a checkpoint carries the data augmentation's position too. Exact when the
    transforms run in the training process (``num_workers`` 0); with worker processes each worker holds its own
    copy, which restarts from its seed after a resume."""

    def __init__(self, transform: Any):
        self.transform = transform

    def _randomizables(self) -> list:
        from monai.transforms import Compose, Randomizable

        found, stack = [], [self.transform]
        while stack:
            t = stack.pop(0)
            if isinstance(t, Compose):
                stack = list(t.transforms) + stack
            elif isinstance(t, Randomizable) and hasattr(t, "R"):
                found.append(t)
        return found

    def state_dict(self) -> dict:
        return {"states": [_numpy_state(t.R.get_state()) for t in self._randomizables()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        targets = self._randomizables()
        if len(targets) != len(state["states"]):
            raise ValueError(
                f"checkpoint holds {len(state['states'])} random-transform states, the pipeline has {len(targets)}"
            )
        for t, st in zip(targets, state["states"]):
            t.R.set_state(_numpy_tuple(st))


def _resume_sampler(engine) -> None:
    loader = getattr(engine.state, "dataloader", None) or getattr(engine, "data_loader", None)
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ResumableRandomSampler):
        sampler.resume_at(engine.state.iteration, loader.batch_size, loader.drop_last)
    elif sampler is not None and engine.state.iteration:
        logger.warning(
            "the training data order is not resumable (%s): the resumed run draws new batches", type(sampler).__name__
        )


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary files a killed save left in ``folder`` (``.<name>.*.tmp.*``), logging each."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
            logger.info("removed %s, left by an interrupted save", tmp)
    return removed


class TrainingPreview:
    """Call ``fn(engine)`` every ``every_n`` iterations on rank 0 (e.g. to sample and write a preview PNG)."""

    def __init__(self, every_n: int, fn: Callable[[Any], Any]):
        self.every_n, self.fn = int(every_n), fn

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.every_n > 0:
            engine.add_event_handler(
                Events.ITERATION_COMPLETED(every=self.every_n), lambda e: self.fn(e) if is_main_process() else None
            )


# --- strict overrides ---------------------------------------------------------------------------------------
def config_ids(config: Any, prefix: str = "") -> set[str]:
    """Every id a MONAI config defines, nested ones as ``a#b#c``."""
    keys: set[str] = set()
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for k, v in items:
        path = f"{prefix}#{k}" if prefix else str(k)
        keys.add(path)
        keys |= config_ids(v, path)
    return keys


def _runner_arguments(argv: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Split ``python -m monai.bundle run`` arguments into (runner arguments, config overrides)."""
    from monai.bundle import scripts

    runner_names = set(inspect.signature(scripts.run).parameters) - {"override"}
    runner_names |= {"workflow_type", "properties_path", "workflow_name"}
    runner, overrides = {}, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq:  # "--key value", or a bare flag
                if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value, i = argv[i + 1], i + 1
                else:
                    value = "True"
            (runner if name in runner_names else overrides)[name] = value
        i += 1
    return runner, overrides


def monai_runner_arguments(argv: list[str] | None = None) -> tuple[dict[str, str], dict[str, str]] | None:
    """(runner arguments, config overrides) of this process when it is ``python -m monai.bundle run ...`` (also
    under torchrun), else None (the bundle is driven from Python)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not (argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py") or argv[0] == "monai.bundle"):
        return None
    args = argv[1:]
    if args and args[0] in ("run", "run_workflow"):
        args = args[1:]
    if args and not args[0].startswith("--"):  # positional run_id
        args = args[1:]
    return _runner_arguments(args)


def check_overrides(config_files: Any, overrides: Mapping[str, Any]) -> None:
    """Raise if an override names a key that none of ``config_files`` defines (MONAI would silently add it)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files)
    valid = config_ids(parser.config)
    unknown = [k for k in overrides if k not in valid]
    if not unknown:
        return
    lines = []
    for key in unknown:
        parent = key.rpartition("#")[0]
        siblings = sorted(k for k in valid if k.rpartition("#")[0] == parent)
        close = difflib.get_close_matches(key, sorted(valid), n=3)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        lines.append(f"--{key}: no such config key{hint}; valid keys here: {', '.join(siblings)}")
    raise KeyError("unknown config override(s):\n  " + "\n  ".join(lines))


#: exception types that, raised by this project's own checks, describe a problem of the user's input or setup
_EXPECTED_TYPES = (ValueError, KeyError, OSError, RuntimeError, FloatingPointError)


def expected_error(exc: BaseException) -> BaseException | None:
    """The innermost cause of ``exc`` when it is one of this project's own checks (an exception class of brainsynth
    or a bundle's scripts, or a ValueError / KeyError / OSError / RuntimeError raised from their code); else None."""
    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    module = type(root).__module__ or ""
    if module.startswith(("brainsynth", "scripts")):
        return root
    tb = root.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename.replace(os.sep, "/") if tb is not None else ""
    ours = "/brainsynth/" in filename or "/scripts/" in filename
    return root if ours and isinstance(root, _EXPECTED_TYPES) else None


def install_last_line_hook() -> None:
    """Under MONAI's runner, an expected error's own message becomes the last line the user sees (``error: ...``),
    after the full traceback, instead of MONAI's "Failed to evaluate ConfigExpression"."""
    if getattr(sys.excepthook, "_brainsynth", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        root = expected_error(exc)
        if root is not None:
            print(f"error: {root}", file=sys.stderr, flush=True)

    hook._brainsynth = True
    sys.excepthook = hook


def idle_cores(interval: float = 0.5, stat_path: str = "/proc/stat") -> int:
    """Cores this process may use that are idle now: the usable cores minus the busy share of all cores, measured
    over ``interval`` seconds from the kernel's CPU counters (Linux); at least 1. Where the counters are missing,
    the usable cores minus the one-minute load average. Processes started together (DDP ranks on a CPU) each see
    the same idle cores: give those a count instead."""
    import time

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def counters() -> tuple[int, int]:
        with open(stat_path) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user..steal; guest time is already inside user

    try:
        total0, idle0 = counters()
        time.sleep(interval)
        total1, idle1 = counters()
        busy_share = 1.0 - (idle1 - idle0) / max(total1 - total0, 1)
        busy = busy_share * (os.cpu_count() or usable)
    except (OSError, ValueError, IndexError):
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(usable, usable - round(busy)))


def set_num_threads(num_threads: int | str | None) -> int:
    """CPU threads torch uses for this run (None: leave torch's default, which OMP_NUM_THREADS sets; ``"idle"``: the
    cores idle when the run starts, see :func:`idle_cores`). On a shared CPU, threads that outnumber the free cores
    spin against other processes; one thread degrades gracefully."""
    if num_threads == "idle":
        num_threads = idle_cores()
        logging.getLogger(__name__).info("num_threads idle: %d core(s) idle, using as many threads", num_threads)
    if num_threads is not None:
        try:
            count = int(num_threads)
        except (TypeError, ValueError):
            count = 0
        if count < 1 or str(num_threads) != str(count):
            raise ValueError(f"num_threads must be a whole number >= 1, 'idle' or null, got {num_threads!r}")
        torch.set_num_threads(count)
    return torch.get_num_threads()


def require_choice(key: str, value: Any, allowed: Sequence[Any]) -> Any:
    """A config value must be one of ``allowed``: the error names the key, the value and the choices (for keys
    such as ``sampler`` that every bundle takes but not every bundle implements in every form)."""
    if value not in allowed:
        raise ValueError(
            f"{key} {value!r} is not available in this bundle; choose one of: {', '.join(map(str, allowed))}"
        )
    return value


def reject_unknown_overrides(argv: list[str] | None = None) -> bool:
    """Make ``python -m monai.bundle run`` strict: fail on any ``--key`` override that the configs do not define.

    MONAI silently adds a misspelled key (``--max_epoch 5`` trains with the default). Call this first in every
    config's ``initialize`` list. It reads the command line of the MONAI bundle runner (also under torchrun) and is
    a no-op when the bundle is driven from Python, where overrides are explicit arguments.
    """
    parsed = monai_runner_arguments(argv)
    if parsed is None:
        return False
    install_last_line_hook()
    runner, overrides = parsed
    if "args_file" in runner:
        from monai.bundle import ConfigParser

        extra = ConfigParser.load_config_file(runner["args_file"])
        runner.update({k: v for k, v in extra.items() if k in ("config_file", "meta_file")})
        overrides.update(
            {
                k: v
                for k, v in extra.items()
                if k
                not in (
                    "config_file",
                    "meta_file",
                    "logging_file",
                    "run_id",
                    "init_id",
                    "final_id",
                    "tracking",
                    "workflow_type",
                    "bundle_root",
                )
            }
        )
    if not overrides or "config_file" not in runner:
        return True
    import ast

    config_files = runner["config_file"]
    try:
        config_files = ast.literal_eval(config_files)
    except (ValueError, SyntaxError):
        pass
    check_overrides(config_files, overrides)
    return True
