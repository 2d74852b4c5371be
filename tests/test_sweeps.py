"""The study as files (sweeps/*.yaml): expansion, the paper's cell counts, CLI overrides on top of a sweep, the cheap
dry run (same cell directories as Hydra's), the skip-completed relaunch, and a tiny sweep run end to end."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, launch, read_json
from hydra import compose, initialize_config_dir

from posttrain.sweep import files
from posttrain.sweep.cells import config_hash
from posttrain.sweep.sweeper import (
    CELL_KEY_FILE,
    HashMemo,
    conf_fingerprint,
    memo_key,
    split_completed,
)

SWEEPS = ROOT / "sweeps"
CONF = ROOT / "conf"
STUDY_ALGOS = ["sft", "dpo", "ipo", "kto", "simpo", "sgrpo", "gspo", "cispo"]
TAXONOMY = ["dpo", "ipo", "hinge", "gpo", "rdpo", "cdpo", "robust_dpo", "dpop", "caldpo", "betadpo", "focalpo", "sppo",
            "odpo", "apo_zero", "exo", "orpo", "cpo", "simpo", "alphapo", "kto"]


def cells_of(name: str, *args: str) -> list[files.Cell]:
    return files.expand(SWEEPS / f"{name}.yaml", list(args), CONF)


def keyed(cells) -> dict[str, dict]:
    """cell directory -> {algo, scale, lora, seed} parsed back from it."""
    out = {}
    for c in cells:
        variant, scale, lora, seed = c.path.split("/")
        out[c.path] = {"algo": variant.split("@")[0], "scale": scale, "lora": lora[5:], "seed": int(seed[5:])}
    return out


def has_algo(algo: str) -> bool:
    return (CONF / "algo" / f"{algo}.yaml").is_file()


def dry(tmp_path, *args: str, flags: tuple = ()) -> tuple[list[str], subprocess.CompletedProcess]:
    proc = launch([*flags, "-m", *args, "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line and not line.startswith("[")], proc


# ------------------------------------------------------------------ the files
def test_every_sweep_file_expands_to_distinct_cells_with_directories():
    names = files.available(SWEEPS)
    for expected in ("paper", "paper_main", "dpo_taxonomy", "lora_factorial", "smoke", "paper_tiny",
                     "paper_main_tiny", "dpo_taxonomy_tiny", "lora_factorial_tiny"):
        assert expected in names
    for name in names:
        cells = cells_of(name)
        assert cells, name
        assert all(c.path for c in cells), f"{name}: every cell directory is computable without composition"
        assert len({c.path for c in cells}) == len(cells), f"{name}: no two cells share a directory"
        assert files.load(SWEEPS / f"{name}.yaml").name == name


ONLINE = {"sgrpo", "gspo", "cispo"}  # conf/algo files being added by the online-RL work


def test_every_algorithm_a_sweep_names_has_a_config():
    named = {keyed([c])[c.path]["algo"] for name in files.available(SWEEPS) for c in cells_of(name)}
    missing = sorted(a for a in named if not has_algo(a))
    assert set(missing) <= ONLINE, f"sweeps name algorithms without conf/algo files: {missing}"
    if missing:
        pytest.skip(f"conf/algo/{{{','.join(missing)}}}.yaml not there yet (online RL in progress): cells naming "
                    "them are left out of the composition checks")


def test_paper_is_the_union_of_its_parts_with_shared_cells_once():
    main, tax, fact = (set(keyed(cells_of(n))) for n in ("paper_main", "dpo_taxonomy", "lora_factorial"))
    paper = keyed(cells_of("paper"))
    # by hand: paper_main = 9 arms (8 algorithms + gold_sft) x 3 scales x 3 seeds (full FT) + 9 x 3 (7B, LoRA)
    #          + sft/dpo/simpo x seeds 789, 1024 at 7B = 81 + 27 + 6
    assert len(main) == 114
    assert len(tax) == 100                      # 20 variants x 5 seeds at 1.5B
    assert len(fact) == 36                      # 2 scales x 2 LoRA x 3 algorithms x 3 seeds
    assert len(main & tax) == 12                # dpo, ipo, kto, simpo at 1.5B, seeds 42/123/456
    assert len(main & fact) == 18               # 3B off and 7B on, sft/dpo/simpo x 3 seeds
    assert not tax & fact
    assert set(paper) == main | tax | fact and len(paper) == 114 + 100 + 36 - 12 - 18 == 220
    assert 200 <= len(paper) <= 240

    rows = list(paper.values())
    main_rows = [keyed(cells_of("paper_main"))[k] for k in main]
    assert {r["algo"] for r in main_rows} == set(STUDY_ALGOS) | {"gold_sft"}
    assert {(r["scale"], r["lora"]) for r in main_rows} == {("0.5b", "off"), ("1.5b", "off"), ("3b", "off"),
                                                            ("7b", "on")}
    five = {r["algo"] for r in main_rows if r["seed"] in (789, 1024)}
    assert five == {"sft", "dpo", "simpo"} and all(r["scale"] == "7b" for r in main_rows if r["seed"] in (789, 1024))
    tax_rows = [r for r in rows if r["scale"] == "1.5b"]
    assert {r["algo"] for r in tax_rows} >= set(TAXONOMY)
    assert sorted({r["seed"] for r in tax_rows if r["algo"] == "hinge"}) == [42, 123, 456, 789, 1024]
    assert {(r["scale"], r["lora"]) for r in rows if r["algo"] == "simpo" and r["scale"] in ("3b", "7b")} == \
        {("3b", "on"), ("3b", "off"), ("7b", "on"), ("7b", "off")}


def test_tiny_twins_mirror_the_study_with_a_control_arm():
    main, tax, fact = (set(keyed(cells_of(n))) for n in ("paper_main_tiny", "dpo_taxonomy_tiny",
                                                         "lora_factorial_tiny"))
    paper = keyed(cells_of("paper_tiny"))
    assert len(main) == 9 * 2 * 3 + 9 * 3 + 3 * 2 == 87   # tiny-s, tiny-m full FT; tiny-l LoRA; + extra seeds
    assert len(tax) == 21 * 5 == 105                       # 20 variants + gold_sft at tiny-s
    assert len(fact) == 2 * 2 * 4 * 3 == 48                # tiny-m/tiny-l x on/off x sft/dpo/simpo/gold_sft
    assert len(main & tax) == 15 and len(main & fact) == 24 and not tax & fact
    assert set(paper) == main | tax | fact and len(paper) == 201
    rows = list(paper.values())
    assert {r["scale"] for r in rows} == {"tiny-s", "tiny-m", "tiny-l"}
    assert all(any(r["algo"] == "gold_sft" for r in keyed(cells_of(n)).values())
               for n in ("paper_main_tiny", "dpo_taxonomy_tiny", "lora_factorial_tiny"))
    smoke = keyed(cells_of("smoke"))
    assert len(smoke) >= 6 and {r["scale"] for r in smoke.values()} == {"tiny-s"}


def test_sweep_file_mistakes_are_one_line_errors(tmp_path):
    def write(name, text):
        (tmp_path / f"{name}.yaml").write_text(text)
        return tmp_path / f"{name}.yaml"

    cases = {
        "bare_off": ("parts:\n  - grid: {algo: dpo, lora: off}\n", "quote the option"),
        "unknown": ("partz: []\n", "unknown key(s) partz"),
        "nogrid": ("parts:\n  - {algo: dpo}\n", "needs a grid"),
        "hydra": ("parts:\n  - grid: {hydra/launcher: slurm_local}\n", "hydra settings"),
        "empty": ("parts:\n  - grid: {seed: []}\n", "empty list"),
        "cycle_a": ("include: [cycle_b]\n", "include cycle"),
        "missing": ("include: [nope]\n", "no such sweep"),
        "sweepish": ("parts:\n  - grid: {algo: 'dpo,simpo'}\n", None),
    }
    write("cycle_b", "include: [cycle_a]\n")
    for name, (text, fragment) in cases.items():
        path = write(name, text)
        if fragment is None:  # a quoted string with a comma stays one value (not a Hydra sweep)
            assert [c.overrides[0] for c in files.expand(path, [], CONF)] == ["algo='dpo,simpo'"]
            continue
        with pytest.raises(files.SweepError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
            files.expand(path, [], CONF)
        assert "\n" not in str(info.value)


def test_cli_overrides_replace_axes_in_every_part_and_add_to_every_cell():
    base = keyed(cells_of("paper"))
    two = keyed(cells_of("paper", "seed=range(0,2)"))
    assert {r["seed"] for r in two.values()} == {0, 1}
    # the structure stays: every (algo, scale, lora) of the paper, each with seeds 0 and 1 (7B extra seeds merge)
    arms = {(r["algo"], r["scale"], r["lora"]) for r in base.values()}
    assert {(r["algo"], r["scale"], r["lora"]) for r in two.values()} == arms and len(two) == 2 * len(arms) == 116
    lr = cells_of("paper_main", "trainer.lr=2e-6")  # rendered as Hydra's basic sweeper renders it: 2e-06
    assert len(lr) == 114 and all("trainer.lr=2e-06" in c.overrides for c in lr)
    assert all(c.path.split("/")[0].endswith("@trainer.lr=2e-06") for c in lr)
    swept = cells_of("lora_factorial", "algo=dpo,kto")   # a command-line sweep replaces the algo axis
    assert {keyed([c])[c.path]["algo"] for c in swept} == {"dpo", "kto"} and len(swept) == 2 * 2 * 2 * 3
    smoke = cells_of("smoke", "trainer.max_steps=1")     # replaces the file's own overrides too
    assert all("trainer.max_steps=1" in c.overrides and "trainer.max_steps=4" not in c.overrides for c in smoke)


# ------------------------------------------------------------------ launch.py: sweep=, dry run
def test_unknown_sweep_is_one_line_listing_the_files_exit_2(tmp_path):
    proc = launch(["-m", "sweep=nope"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    line = proc.stderr.strip()
    assert "\n" not in line and "unknown sweep 'nope'" in line and "Traceback" not in line
    assert all(name in line for name in files.available(SWEEPS))
    assert not (tmp_path / "outputs").exists()


def test_dry_run_of_the_paper_is_fast_lists_every_cell_and_imports_no_torch(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "launch.py"), "-m", "sweep=paper",
                           "dry_run=true", f"output_root={tmp_path}/outputs"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "220 cells" and len(lines) == 221
    assert elapsed < 5, f"dry run took {elapsed:.1f}s (interpreter included)"
    imported = {row.split("|")[-1].strip() for row in proc.stderr.splitlines() if row.startswith("import time:")}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "transformers", "lm_eval")}
    assert lines[0].startswith("sft/0.5b/lora-off/seed-42  algo=sft scale=0.5b lora=off seed=42 sweep_name=paper ")
    assert not (tmp_path / "outputs").exists(), "a dry run writes nothing"


def test_dry_run_seed_override_and_plain_grid_format(tmp_path):
    lines, _ = dry(tmp_path, "sweep=paper_main", "seed=0-1")
    assert lines[-1] == f"{len(lines) - 1} cells" and len(lines) - 1 == 9 * 4 * 2
    assert all(line.split("  ")[0].rsplit("/", 1)[1] in ("seed-0", "seed-1") for line in lines[:-1])
    grid, _ = dry(tmp_path, "algo=dpo,simpo,kto", "scale=0.5b,1.5b,7b", "seed=0-4")
    assert grid[-1] == "45 cells" and len(grid) == 46
    cell, overrides = grid[0].split("  ", 1)
    assert cell == "dpo/0.5b/lora-off/seed-0"
    assert [o for o in overrides.split() if not o.startswith("output_root=")] == \
        ["algo=dpo", "scale=0.5b", "seed=0", "dry_run=True"]
    # the study's design from the mission's command: the scale picks LoRA (7b: on), an explicit lora= wins
    by_scale = {}
    for line in grid[:-1]:
        algo, scale, lora, _ = line.split("  ")[0].split("/")
        by_scale.setdefault(scale, set()).add(lora)
    assert by_scale == {"0.5b": {"lora-off"}, "1.5b": {"lora-off"}, "7b": {"lora-on"}}
    off, _ = dry(tmp_path, "algo=dpo", "scale=7b", "lora=off")
    assert off[0].startswith("dpo/7b/lora-off/seed-0")


def test_the_scale_picks_the_lora_default_and_lora_wins():
    assert _compose(["scale=7b"], hydra=False).lora.enabled is True
    assert _compose(["scale=7b", "lora=off"], hydra=False).lora.enabled is False
    assert _compose(["scale=0.5b"], hydra=False).lora.enabled is False
    assert _compose(["scale=0.5b", "lora=on"], hydra=False).lora == _compose(["scale=7b"], hydra=False).lora
    assert _compose([], hydra=False).lora.enabled is False, "the embedded default stays full fine-tuning"


@pytest.mark.parametrize("args", [
    ["sweep=smoke", "trainer.lr=2e-6"],
    ["algo=dpo,simpo", "scale=tiny-s,tiny-m", "seed=0-1", "trainer.max_steps=2", "lora.enabled=true"],
    ["algo=dpo", "scale=0.5b,7b", "seed=0-1"],
])
def test_fast_dry_run_prints_what_hydra_prints(tmp_path, args):
    fast, _ = dry(tmp_path, *args)
    # `-cd conf` is a flag the cheap path leaves to Hydra: the same command through Hydra's sweeper and launcher
    slow, proc = dry(tmp_path, *args, flags=("-cd", str(CONF)))
    assert "HYDRA" in proc.stdout + proc.stderr, "the second listing came through Hydra"
    assert fast == slow


def _compose(overrides: list[str], hydra: bool):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_cell_directories_equal_hydras_composed_subdir_for_a_sample():
    rng = random.Random(0)
    sample = []
    for name, extra in [("paper", []), ("paper_tiny", []), ("smoke", ["trainer.warmup_ratio=0.2"]),
                        ("paper_main", ["trainer.lr=2e-6", "data.num_prompts=64"])]:
        cells = cells_of(name, *extra)
        sample += rng.sample(cells, min(12, len(cells)))
    sample += files.grid(["algo=dpo,kto", "scale=7b", "lora.enabled=true", "seed=range(3,5)", "sweep_name=x"], CONF)
    skipped = {c.overrides[0] for c in sample if not has_algo(keyed([c])[c.path]["algo"])}
    checked = 0
    for cell in sample:
        if not has_algo(keyed([cell])[cell.path]["algo"]):
            continue  # conf/algo/<name>.yaml not there yet: nothing for Hydra to compose
        assert _compose(list(cell.overrides), hydra=True).hydra.sweep.subdir == cell.path, cell.overrides
        checked += 1
    assert checked >= 30, f"compared {checked} cells (skipped, no conf/algo file: {sorted(skipped)})"


# ------------------------------------------------------------------ relaunch: skip completed without composing
def _fake_completed(sweep_dir: Path, cells, wrong: set = frozenset()) -> None:
    for cell in cells:
        cfg = _compose(list(cell.overrides), hydra=False)
        run_dir = sweep_dir / cell.path
        run_dir.mkdir(parents=True, exist_ok=True)
        chash = "0" * 12 if cell.path in wrong else config_hash(cfg)
        (run_dir / "result.json").write_text(json.dumps({"status": "completed", "config_hash": chash}))


def test_split_completed_uses_the_memo_and_composes_only_completed_cells(tmp_path):
    cells = files.grid(["algo=dpo,kto", "seed=0,1"], CONF)
    done, failed, changed, missing = cells
    (tmp_path / failed.path).mkdir(parents=True)
    (tmp_path / failed.path / "result.json").write_text(json.dumps({"status": "failed", "config_hash": "h1"}))
    for cell, chash in ((done, "h0"), (changed, "old")):
        (tmp_path / cell.path).mkdir(parents=True)
        (tmp_path / cell.path / "result.json").write_text(json.dumps({"status": "completed", "config_hash": chash}))
    composed = []

    def identity(overrides, num):
        composed.append(list(overrides))
        return files.cell_dir(overrides, CONF), {done.path: "h0", changed.path: "new"}[files.cell_dir(overrides, CONF)]

    memo = HashMemo(tmp_path, "fp1")
    todo, skipped = split_completed(cells, tmp_path, memo, identity)
    assert [c for c, _ in skipped] == [done] and todo == [failed, changed, missing]
    assert len(composed) == 2, "only cells with a completed result.json are composed"
    memo.save()
    composed.clear()
    todo, skipped = split_completed(cells, tmp_path, HashMemo(tmp_path, "fp1"), identity)
    assert [c for c, _ in skipped] == [done] and composed == [], "the memo answers a relaunch"
    split_completed(cells, tmp_path, HashMemo(tmp_path, "fp2"), identity)
    assert len(composed) == 2, "another conf fingerprint: the memo does not apply"
    # the key file a job writes in its cell directory (MemoTask) answers too, under the same fingerprint only
    (tmp_path / done.path / CELL_KEY_FILE).write_text(json.dumps({"key": memo_key("fp3", done.overrides),
                                                                  "hash": "h0"}))
    composed.clear()
    todo, skipped = split_completed(cells, tmp_path, HashMemo(tmp_path, "fp3"), identity)
    assert [c for c, _ in skipped] == [done] and composed == [list(changed.overrides)]


def test_conf_fingerprint_follows_every_conf_file(tmp_path):
    shutil.copytree(CONF, tmp_path / "conf")
    sources = [{"schema": "file", "path": str(tmp_path / "conf"), "provider": "main"}]
    first = conf_fingerprint(sources)
    assert conf_fingerprint(sources) == first
    target = tmp_path / "conf" / "algo" / "dpo.yaml"
    target.write_text(target.read_text().replace("beta: 0.1", "beta: 0.2"))
    assert conf_fingerprint(sources) != first


def test_relaunch_of_a_completed_sweep_launches_nothing(tmp_path):
    sweep = tmp_path / "mini.yaml"
    sweep.write_text("parts:\n  - grid: {algo: [dpo, sft], scale: tiny-s, lora: ['off'], seed: [3, 4]}\n"
                     "overrides: {trainer.max_steps: 2}\n")
    args = ["-m", f"sweep={sweep}", "logger=none"]
    cells = files.expand(sweep, ["logger=none", "sweep_name=mini", f"output_root={tmp_path}/outputs"], CONF)
    sweep_dir = tmp_path / "outputs" / "mini"
    _fake_completed(sweep_dir, cells)
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("result.json")}
    for attempt in ("composes the completed cells, memoises", "answered by the memo"):
        t0 = time.monotonic()
        proc = launch(args, tmp_path)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "4 cells: 4 already completed with the same config" in proc.stdout and "0 to launch" in proc.stdout
        assert "Launching" not in proc.stdout + proc.stderr, attempt
    assert elapsed < 10, f"relaunch took {elapsed:.1f}s"
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("result.json")} == before
    manifest = read_json(sweep_dir / "sweep.json")
    assert manifest["sweep"] == "mini" and sorted(c["cell"] for c in manifest["cells"]) == sorted(c.path for c in cells)
    assert read_json(sweep_dir / ".config_hashes.json")["cells"], "the memo was written"


@pytest.mark.slurm
def test_a_sweep_file_submits_through_the_slurm_launcher(tmp_path):
    if shutil.which("sbatch") is None or subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "status"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("local Slurm is down; start it with scripts/local_slurm.sh up")
    sweep = tmp_path / "held.yaml"
    sweep.write_text("parts:\n  - grid: {algo: [dpo, sft], scale: tiny-s, lora: ['off'], seed: [3]}\n")
    # --hold: the jobs are queued but never start (this checks submission only); cancelled below
    proc = launch(["-m", f"sweep={sweep}", "hydra/launcher=slurm_local",
                   "+hydra.launcher.additional_parameters.hold=true"], tmp_path, timeout=120)
    manifest = read_json(tmp_path / "outputs" / "held" / "sweep.json")
    ids = [c["job_id"] for c in manifest["cells"]]
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Submitted 2 cell(s) to Slurm" in proc.stdout + proc.stderr
        assert sorted(c["cell"] for c in manifest["cells"]) == ["dpo/tiny-s/lora-off/seed-3",
                                                               "sft/tiny-s/lora-off/seed-3"]
        assert all(ids) and manifest["launcher"] == "slurm_local"
    finally:
        subprocess.run(["scancel", *[i for i in ids if i]], capture_output=True)


# ------------------------------------------------------------------ a real tiny sweep
@pytest.mark.slow
def test_smoke_sweep_runs_to_completed_results_and_relaunches_as_a_no_op(tiny_base, tmp_path):
    fast = ["trainer.max_steps=1", "eval.limit=5", "data.num_prompts=32", "logger=none"]
    proc = launch(["-m", "sweep=smoke", *fast], tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "smoke"
    expected = [c.path for c in cells_of("smoke", *fast)]
    assert len(expected) >= 6
    for cell in expected:
        result = read_json(sweep_dir / cell / "result.json")
        assert result["status"] == "completed" and result["train"]["steps"] == 1, cell
    manifest = read_json(sweep_dir / "sweep.json")
    assert manifest["sweep"] == "smoke" and sorted(c["cell"] for c in manifest["cells"]) == sorted(expected)
    again = launch(["-m", "sweep=smoke", *fast], tmp_path, timeout=300)
    assert again.returncode == 0 and f"{len(expected)} already completed" in again.stdout
    assert "0 to launch" in again.stdout and "[completed]" not in again.stdout
    status = subprocess.run([sys.executable, "-m", "posttrain.sweep", "status", str(sweep_dir)], capture_output=True,
                            text=True, env={**os.environ}, timeout=120)
    assert status.returncode == 0 and f"completed={len(expected)} failed=0" in status.stdout
