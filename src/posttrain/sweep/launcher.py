"""A Hydra launcher that submits every cell of a multirun to Slurm through submitit and returns at once.

Hydra's own submitit launcher waits until every job has ended; on a cluster a study of ~240 cells runs for days, so
this one submits and returns as soon as every cell has a job id, having written ``sweep.json`` (manifest.py) in the
sweep directory. ``python -m posttrain.sweep status|wait DIR`` follows the jobs from there.

Selected with ``hydra/launcher=slurm_local`` (the one-node cluster of scripts/local_slurm.sh) or
``hydra/launcher=slurm_h100`` (conf/hydra/launcher/*.yaml); both extend the schema ``posttrain_slurm`` registered
below, which adds to hydra-submitit-launcher's ``SlurmQueueConf``:

- ``max_num_timeout`` (default 3): how many times a job that hits its time limit is requeued. Every job is
  requeueable (``--requeue``): on a preemption or time-limit signal (USR2, ``signal_delay_s`` before the limit)
  submitit calls :meth:`checkpoint`, which resubmits the same call; the task resumes from its own checkpoint files
  in its cell directory (trainer.checkpoint_every). A preemption does not count against ``max_num_timeout``.
- ``gpus``: GPUs per run. When set, each GPU is one task (``gpus_per_node = tasks_per_node = gpus``) and
  ``cpus_per_gpu`` becomes ``--cpus-per-task``; 0 means a CPU-only job (one task). slurm_h100 sets it to
  ``${oc.select:scale.gpus,1}``, so the GPU count comes from conf/scale.
- ``skip_if_done``: dotted path of ``fn(cell_config, run_dir) -> bool``; cells for which it returns True are not
  submitted (their sweep.json entries are kept). ``cell_config`` is the cell's composed config, hydra node included.
  The shipped configs use :func:`completed_with_same_config` (result.json completed with the same config hash: the
  rule run.py skips by), so a relaunch queues only failed, cancelled, missing or changed cells; null submits all.
- ``dry_run=true`` in the task config: nothing is submitted; the cells run in-process as with the basic launcher
  (the task only lists itself).

The launcher parameters are resolved per cell, so an interpolation into the task config (``${scale.gpus}``) gives
each cell its own resources in a sweep over scales; cells whose parameters agree go into one Slurm job array.

In each job, before the task runs, ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (and torch's thread count, when torch is
already imported) are set to the CPUs Slurm gave each task (``SLURM_CPUS_PER_TASK``, else 1): several jobs share a
node's cores, and torch's default of one thread per core of the node slows them all several-fold.

The job composes its config again from the overrides (as Hydra's submitit launcher does) with
``hydra.sweep.subdir`` fixed to the cell directory computed at submission, so the job lands exactly where
sweep.json says; ``hydra.job.id`` is the Slurm job id. A task that raises makes the Slurm job end FAILED.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from posttrain.sweep.manifest import make_entry, now_iso, read_manifest, write_manifest

log = logging.getLogger(__name__)

#: The class Hydra instantiates; it must live under the hydra_plugins namespace package (Hydra 1.3 refuses others).
LAUNCHER_TARGET = "hydra_plugins.posttrain_launcher.PosttrainSlurmLauncher"
SCHEMA_NAME = "posttrain_slurm"

# Keys of our schema that are not submitit executor parameters.
_OWN_KEYS = {"_target_", "submitit_folder", "max_num_timeout", "gpus", "skip_if_done", "prepare_jobs"}


@dataclass
class PosttrainSlurmConf(SlurmQueueConf):
    """hydra.launcher for Slurm: hydra-submitit-launcher's SlurmQueueConf plus non-blocking submission."""

    _target_: str = LAUNCHER_TARGET
    # Requeues after a time-out (submitit's default is 0); preemptions are always requeued.
    max_num_timeout: int = 3
    # GPUs per run, one task per GPU (None: use gpus_per_node / tasks_per_node as given; 0: CPU-only job).
    gpus: Optional[int] = None
    # Dotted path of fn(cell_config, run_dir) -> bool; True: the cell is done, do not submit it.
    skip_if_done: Optional[str] = None
    # One preparation job per scale before its cells, which depend on it (afterok): posttrain.sweep.preparation.
    prepare_jobs: bool = True


ConfigStore.instance().store(group="hydra/launcher", name=SCHEMA_NAME, node=PosttrainSlurmConf,
                             provider="posttrain")


def _default_partition() -> Optional[str]:
    """The cluster's default partition (the one `sinfo` marks with '*'), or None when sinfo is missing."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.splitlines() if line.strip()]
    for name in names:
        if name.endswith("*"):
            return name[:-1]
    return names[0] if names else None


# ${slurm_default_partition:} in conf/hydra/launcher/slurm_local.yaml; resolved only when that launcher is used.
if not OmegaConf.has_resolver("slurm_default_partition"):
    OmegaConf.register_new_resolver("slurm_default_partition", _default_partition)


def job_threads() -> int:
    """Set OMP/MKL (and torch's, when imported) thread counts to the CPUs Slurm gave this task; return it."""
    raw = os.environ.get("SLURM_CPUS_PER_TASK") or "1"
    try:
        threads = max(1, int(raw.split("(")[0]))
    except ValueError:
        threads = 1
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def executor_parameters(params: Dict[str, Any]) -> Dict[str, Any]:
    """submitit AutoExecutor parameters (generic names plain, Slurm ones prefixed ``slurm_``) from a resolved
    hydra.launcher node of the posttrain_slurm schema."""
    params = dict(params)
    gpus = params.get("gpus")
    if gpus is not None:
        gpus = int(gpus)
        if gpus > 0:
            # Each GPU is one task: ranks come from submitit's JobEnvironment (SLURM_PROCID / SLURM_LOCALID).
            params["gpus_per_node"] = gpus
            params["tasks_per_node"] = gpus
        else:
            params["gpus_per_node"] = None
            params["tasks_per_node"] = 1
            params["mem_per_gpu"] = None
    if params.get("cpus_per_gpu") is not None:
        # One GPU per task, so CPUs per GPU = CPUs per task; as --cpus-per-task, SLURM_CPUS_PER_TASK is set in
        # every task (--cpus-per-gpu would leave it unset and needs --gpus-per-task).
        params["cpus_per_task"] = params.pop("cpus_per_gpu")
    params.pop("cpus_per_gpu", None)
    additional = dict(params.get("additional_parameters") or {})
    additional.setdefault("requeue", True)
    params["additional_parameters"] = additional
    setup = list(params.get("setup") or [])
    params["setup"] = [
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
        "export MKL_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
    ] + setup
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    out: Dict[str, Any] = {}
    for key, value in params.items():
        if key in _OWN_KEYS or value is None:
            continue
        out[key if key in base_keys else f"slurm_{key}"] = value
    return out


def _check_ranks(gpus, cfg: DictConfig, overrides) -> None:
    """One task per GPU trains ONE model only through DeepSpeed (posttrain.cell.ranks_refusal)."""
    from posttrain.cell import ranks_refusal

    refusal = ranks_refusal(int(gpus or 0), cfg.get("deepspeed"), f"cell {' '.join(overrides)}: {int(gpus or 0)} GPUs "
                            "(one task each)", fix="give the run one GPU with hydra.launcher.gpus=1")
    if refusal:
        _refuse(refusal)


def _refuse(message: str) -> None:
    """A mistake in the sweep's config, found before anything is submitted: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def completed_with_same_config(cell_config: DictConfig, run_dir: Path) -> bool:
    """Default ``skip_if_done``: posttrain.cell.is_done (result.json completed with this cell's config hash, the
    rule run.py skips by), checked before submission so a relaunch queues only the cells that need it."""
    import copy

    from posttrain.cell import config_hash, is_done

    def chash() -> str:
        task_cfg = copy.deepcopy(cell_config)
        with open_dict(task_cfg):
            task_cfg.pop("hydra", None)  # as run_job hands the task its config
        return config_hash(task_cfg)

    try:
        return is_done(run_dir, chash)
    except Exception:  # noqa: BLE001 - a config that does not resolve here is left to the job to report
        return False


def _locate(path: str) -> Any:
    from hydra.utils import get_method

    return get_method(path)


@dataclass
class _Cell:
    num: int
    overrides: List[str]
    subdir: str
    run_dir: Path
    params: Dict[str, Any]
    skip: bool
    subdir_key: str = ""  # the cell as sweep.json names it (relative to the sweep directory, normalised)
    algo: str = ""
    lora: bool = False
    after: Optional[str] = None  # the job id of its scale's preparation job


def _active_jobs(job_ids: List[str]) -> set:
    """The job ids among ``job_ids`` that squeue still lists (pending, running, requeued)."""
    if not job_ids:
        return set()
    from posttrain.sweep.status import _run, parse_squeue

    out = _run(["squeue", "-h", "-r", "-j", ",".join(sorted(set(job_ids))), "-o", "%i|%T|%M"])
    return set(parse_squeue(out or ""))


class PosttrainSlurmLauncherImpl(BaseSubmititLauncher):
    """The implementation; Hydra instantiates the subclass hydra_plugins.posttrain_launcher.PosttrainSlurmLauncher."""

    _EXECUTOR = "slurm"

    # ------------------------------------------------------------------ in the job
    def __call__(  # type: ignore[override]
        self,
        sweep_overrides: List[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: Dict[type, Singleton],
        subdir: Optional[str] = None,
    ) -> JobReturn:
        import submitit

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        job_threads()
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
        with open_dict(sweep_config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            job.num = job_num
        if subdir is not None:
            with open_dict(sweep_config.hydra.sweep):
                sweep_config.hydra.sweep.subdir = subdir
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=sweep_config,
            job_dir_key=job_dir_key,
            job_subdir_key="hydra.sweep.subdir",
        )
        if ret.status == JobStatus.FAILED:
            # Hydra caught the task's exception; re-raise it so the Slurm job ends FAILED (and the job's .err log
            # has the traceback) instead of COMPLETED.
            raise ret._return_value
        return ret

    # checkpoint() is BaseSubmititLauncher's: on a preemption / time-limit signal submitit calls it and requeues
    # DelayedSubmission(self, *same arguments); the task finds its own checkpoint files in its cell directory.

    # ------------------------------------------------------------------ at submission
    def _cells(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path) -> List[_Cell]:
        assert self.hydra_context is not None and self.config is not None
        skip_fn = None
        skip_path = self.params.get("skip_if_done")
        if skip_path:
            skip_fn = _locate(str(skip_path))
        hydra_config = HydraConfig.instance()
        saved = hydra_config.cfg
        cells: List[_Cell] = []
        try:
            for offset, overrides in enumerate(job_overrides):
                num = initial_job_idx + offset
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(cfg):
                    cfg.hydra.job.id = f"job_id_for_{num}"
                    cfg.hydra.job.num = num
                hydra_config.set_config(cfg)  # for ${hydra:...} in subdir or launcher parameters
                subdir = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
                run_dir = Path(os.path.normpath(sweep_dir / subdir))
                if run_dir == sweep_dir or sweep_dir not in run_dir.parents:
                    _refuse(f"hydra.sweep.subdir {subdir!r} of cell {list(overrides)} does not name a directory "
                            f"inside the sweep directory {sweep_dir}")
                params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
                assert isinstance(params, dict)
                _check_ranks(params.get("gpus"), cfg, overrides)
                skip = bool(skip_fn(cfg, run_dir)) if skip_fn is not None else False
                cells.append(_Cell(num, list(overrides), subdir, run_dir, params, skip,
                                   run_dir.relative_to(sweep_dir).as_posix(),
                                   str(OmegaConf.select(cfg, "algo.name", default="") or ""),
                                   bool(OmegaConf.select(cfg, "lora.enabled", default=False))))
        finally:
            hydra_config.cfg = saved
        seen: Dict[Path, List[str]] = {}
        for cell in cells:
            if cell.run_dir in seen:
                _refuse(f"two cells of this sweep share the directory {cell.run_dir}: {seen[cell.run_dir]} and "
                        f"{cell.overrides}; hydra.sweep.subdir must tell distinct configs apart")
            seen[cell.run_dir] = cell.overrides
        return cells

    def _submit_preparation(self, cells: List[_Cell], singleton_state, launcher_name: str) -> List[str]:
        """One preparation job per scale of ``cells`` (posttrain.sweep.preparation); each cell's parameters then
        depend on its scale's job. Returns the job ids."""
        import submitit

        from posttrain.sweep import preparation

        ids: List[str] = []
        wanted = [c for c in cells if c.algo and c.params.get("prepare_jobs", True)]  # posttrain cells only
        for key, members in preparation.groups(wanted).items():
            params = preparation.job_parameters(members[0].params)
            executor = submitit.AutoExecutor(folder=str(params["submitit_folder"]), cluster="slurm",
                                             slurm_max_num_timeout=int(params.get("max_num_timeout") or 0))
            executor.update_parameters(**executor_parameters(params))
            overrides = members[0].overrides + [preparation.prepare_override([c.algo for c in members],
                                                                             [c.lora for c in members])]
            try:
                job = executor.submit(self, overrides, "hydra.sweep.dir", members[0].num, "prepare",
                                      singleton_state, preparation.subdir(key))
            except (submitit.core.utils.FailedJobError, OSError) as exc:
                reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                _refuse(f"Slurm refused the preparation job of hydra/launcher={launcher_name}: {reason}; adjust "
                        "hydra.launcher.* (partition, gpus, mem_per_gpu, ...) or set hydra.launcher.prepare_jobs="
                        "false")
            log.info(f"\tpreparation job {job.job_id}: {len(members)} cell(s) of "
                     f"{' '.join(json.loads(key)) or 'the default scale'} start after it")
            ids.append(str(job.job_id))
            for cell in members:
                cell.params, cell.after = preparation.after(cell.params, str(job.job_id)), str(job.job_id)
        return ids

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        if OmegaConf.select(self.config, "dry_run", default=False) is True:
            # A dry run submits nothing: run the cells in this process as Hydra's basic launcher does (the task
            # lists its cell and returns), so the listing and its callbacks are the same whatever the launcher.
            from hydra._internal.core_plugins.basic_launcher import BasicLauncher

            basic = BasicLauncher()
            basic.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
            return basic.launch(job_overrides, initial_job_idx)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep and self.config.hydra.sweep.mode is not None:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        launcher_name = str(self.config.hydra.runtime.choices.get("hydra/launcher") or SCHEMA_NAME)
        sweep_name = OmegaConf.select(self.config, "sweep_name", default=None)
        sweep_name = str(sweep_name) if sweep_name else sweep_dir.name

        cells = self._cells(job_overrides, initial_job_idx, sweep_dir)
        # A cell whose job from an earlier launch is still queued or running is not submitted twice.
        known = {str(e.get("cell")): e for e in ((read_manifest(sweep_dir) or {}).get("cells") or [])}
        queued = _active_jobs([str(known[c.subdir_key]["job_id"]) for c in cells
                               if not c.skip and known.get(c.subdir_key, {}).get("job_id")])
        in_queue = [c for c in cells if not c.skip and str(known.get(c.subdir_key, {}).get("job_id")) in queued]
        for cell in in_queue:
            cell.skip = True
        singleton_state = Singleton.get_state()
        if any(not c.skip for c in cells) and shutil.which("sbatch") is None:
            _refuse(f"hydra/launcher={launcher_name} submits to Slurm, but there is no sbatch on this machine; run "
                    "on the cluster's login node, or drop hydra/launcher=... to run the cells here")
        prepared = self._submit_preparation([c for c in cells if not c.skip], singleton_state, launcher_name)
        groups: Dict[str, List[_Cell]] = {}
        for cell in cells:
            if not cell.skip:
                groups.setdefault(json.dumps(cell.params, sort_keys=True, default=str), []).append(cell)

        skipped = [c for c in cells if c.skip]
        if skipped:
            # Keep a skipped cell's entry (and its job id) if sweep.json has one; add it otherwise.
            fresh = [make_entry(sweep_dir, c.run_dir, overrides=c.overrides, job_id=None)
                     for c in skipped if c.subdir_key not in known]
            write_manifest(sweep_dir, fresh, sweep=sweep_name, launcher=launcher_name)
            if len(skipped) > len(in_queue):
                log.info(f"{len(skipped) - len(in_queue)} cell(s) already done, not submitted")
            if in_queue:
                log.info(f"{len(in_queue)} cell(s) still queued or running from an earlier launch, not submitted")

        job_ids: Dict[int, str] = {}
        for key, group in groups.items():
            params = group[0].params
            executor = submitit.AutoExecutor(
                folder=str(params["submitit_folder"]), cluster="slurm",
                slurm_max_num_timeout=int(params.get("max_num_timeout") or 0))
            executor.update_parameters(**executor_parameters(params))
            for cell in group:
                log.info(f"\t#{cell.num} : {' '.join(filter_overrides(cell.overrides))}")
            try:
                jobs = executor.map_array(
                    self,
                    [c.overrides for c in group],
                    ["hydra.sweep.dir"] * len(group),
                    [c.num for c in group],
                    [f"job_id_for_{c.num}" for c in group],
                    [singleton_state] * len(group),
                    [c.subdir for c in group],
                )
            except (submitit.core.utils.FailedJobError, OSError) as exc:
                reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
                done = f" ({len(job_ids)} cell(s) already submitted are in {sweep_dir / 'sweep.json'})" if job_ids \
                    else ""
                _refuse(f"Slurm refused {len(group)} cell(s) of hydra/launcher={launcher_name}: {reason}{done}; "
                        "adjust hydra.launcher.* (partition, gpus, mem_per_gpu, ...)")
            submitted = now_iso()
            for cell, job in zip(group, jobs):
                job_ids[cell.num] = str(job.job_id)
            # Write after every array, so a later refused submission does not lose the jobs already queued.
            write_manifest(
                sweep_dir,
                [make_entry(sweep_dir, c.run_dir, overrides=c.overrides, job_id=job_ids[c.num], submitted=submitted,
                            after=c.after) for c in group],
                sweep=sweep_name, launcher=launcher_name)

        n_sub = len(job_ids)
        arrays = sorted({jid.split("_")[0] for jid in job_ids.values()})
        log.info(
            f"Submitted {n_sub} cell(s) to Slurm ({len(arrays)} job array(s): {', '.join(arrays) or '-'}"
            + (f", after {len(prepared)} preparation job(s): {', '.join(prepared)}" if prepared else "")
            + f"); {len(skipped)} skipped. Follow with: python -m posttrain.sweep status {sweep_dir}")
        for cell in in_queue:
            job_ids.setdefault(cell.num, str(known[cell.subdir_key]["job_id"]))

        returns: List[JobReturn] = []
        for cell in cells:
            ret = JobReturn(overrides=cell.overrides, working_dir=str(cell.run_dir),
                            task_name=str(self.config.hydra.job.name), status=JobStatus.COMPLETED)
            ret.return_value = {"cell": cell.subdir, "run_dir": str(cell.run_dir),
                                "job_id": job_ids.get(cell.num), "skipped": cell.skip}
            returns.append(ret)
        return returns
