"""The README's shell blocks run as written (issue 27): it cannot drift from the CLI.

Every command of every ```bash block is extracted (continuation lines joined, comments dropped) and
must have an entry in PLAN, and every PLAN entry must still be in the README, so a new or changed
command fails here until it is run. How each one is run (the README's ImageNet and GPU commands
cannot run on the CPU as they are):

- "run": as written, in a shell that sourced .venv/bin/activate (the README's first step);
- "toy": as written with the README's example paths mapped to a tiny generated dataset and a temporary
  run directory (TOY below), worker counts cut to 2 and the recipe's ViT-B replaced by tiny_cpu for
  one epoch where it trains; these are `slow`;
- "help": the same subcommand with `--help` (the real one needs ImageNet, a GPU or a checkpoint);
- "dry": `make -n` / GPU_CHECK_DRY_RUN=1, which print the commands they would run (the whole demo or
  test suite, or a GPU check, does not fit a test);
- "skip": needs what a CPU machine lacks (nvidia-smi).

Block by block (the README's order):
 1. The two commands: `make demo`, `make test` -> dry (`make -n`), and `supmae demo --help`.
 2. From ImageNet to a cost report: `source .venv/bin/activate` -> run; `supmae convert` -> toy;
    `supmae doctor ... --gpu h100` -> toy (the data sheet's step, loaders at batch 16); `torchrun ...
    pretrain` -> toy (2 ranks, tiny_cpu, 1 epoch); `torchrun ... finetune` -> help; `supmae report` -> toy
    (the toy pretraining's run directory).
 3. Several nodes: `torchrun --nnodes 2 ... --rdzv-endpoint HEAD:29500` -> toy: two agents on this
    machine (HEAD = 127.0.0.1), one rank each, started at once.
 4. Converting: `supmae convert SRC OUT` -> toy; `supmae convert --verify OUT` -> toy.
 5. SLURM: `supmae convert ... --shard` -> toy, for task 0 and 1 of 2; the `# then: ... --merge` line -> toy.
 6. Pretraining: `--list-recipes` -> run; the ImageNet pretrain -> help; `tiny_cpu --print-config` -> run.
 7. Fine-tuning, probing, evaluation, visualize -> help.
 8. Export -> help.
 9. Cost: `supmae report` -> toy; `doctor`, `bench table1/step/loaders/convert` -> help;
    `bash benchmarks/gpu_check.sh` -> dry (GPU_CHECK_DEVICE=cpu GPU_CHECK_DRY_RUN=1).
10. Installing on a GPU node: `nvidia-smi` -> skip; `make setup` -> run (the set-up is done: seconds);
    the torch check -> run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from procs import REPO, free_port

README = os.path.join(REPO, "README.md")
VENV_BIN = os.path.join(REPO, ".venv", "bin")


def readme_commands() -> list[tuple[int, str]]:
    """(block number from 1, command) for every command line of the README's ```bash blocks; the
    `# then: CMD` line of the SLURM block counts as a command."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    out = []
    for n, block in enumerate(re.findall(r"```bash\n(.*?)```", text, re.DOTALL), start=1):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line).strip()
            line = line.removeprefix("# then: ")
            if not line or line.startswith("#"):
                continue
            out.append((n, re.sub(r"\s+#.*$", "", line).strip()))
    return out


# command (as the README writes it, whitespace collapsed, trailing comment dropped) -> how it is run
PLAN: dict[str, str] = {
    "make demo": "dry",
    "make test": "dry",
    "source .venv/bin/activate": "run",
    "supmae convert ~/Downloads/imagenet /data/imagenet-256 --max-res 256 --workers 16": "toy",
    "supmae doctor --data /data/imagenet-256 --gpu h100 --gpus-per-node 8 --cores-per-node 96 "
    "--price-per-gpu-hour 2.5": "toy",
    "torchrun --nproc_per_node 8 -m supmae.cli pretrain --recipe supmae_vit_b16_400ep --data.path "
    "/data/imagenet-256 --output-dir runs/supmae400 --resume auto": "toy",
    "torchrun --nproc_per_node 8 -m supmae.cli finetune --recipe vit_b16_ft100 --pretrained "
    "runs/supmae400/checkpoint-last.pth --data.path /data/imagenet-256 --output-dir runs/ft --resume auto": "help",
    "supmae report runs/supmae400 --price-per-gpu-hour 2.5": "toy",
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HEAD:29500 --rdzv-id supmae400 "
    "-m supmae.cli pretrain --recipe supmae_vit_b16_400ep --data.path /data/imagenet-256 --output-dir "
    "/shared/runs/supmae400 --resume auto": "toy",
    "supmae convert SRC OUT --max-res 256 --quality 90 --workers 16": "toy",
    "supmae convert --verify OUT": "toy",
    "supmae convert ~/Downloads/imagenet /scratch/in256.part-$SLURM_ARRAY_TASK_ID --workers $SLURM_CPUS_PER_TASK "
    "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT": "toy",
    "supmae convert --merge /scratch/in256.part-{0..15} /data/imagenet-256": "toy",
    "supmae pretrain --list-recipes": "run",
    "supmae pretrain --recipe supmae_vit_b16_400ep --data.path /data/imagenet-256 --output-dir runs/supmae400": "help",
    "supmae pretrain --recipe tiny_cpu --print-config": "run",
    "supmae finetune --recipe vit_b16_ft100 --pretrained runs/supmae400/checkpoint-last.pth --data.path "
    "/data/imagenet-256 --output-dir runs/ft": "help",
    "supmae linprobe --recipe vit_b16_lin90 --pretrained runs/supmae400/checkpoint-last.pth --data.path "
    "/data/imagenet-256 --output-dir runs/lin": "help",
    "supmae eval --checkpoint runs/ft/checkpoint-best.pth --data.path /data/imagenet-256": "help",
    "supmae visualize --checkpoint runs/supmae400/checkpoint-last.pth --images a.jpg b.jpg --out grid.png": "help",
    "supmae export --checkpoint runs/supmae400/checkpoint-last.pth --to timm encoder.safetensors": "help",
    "supmae export --checkpoint runs/supmae400/checkpoint-last.pth --to mae encoder.pth": "help",
    "supmae report RUN_DIR --price-per-gpu-hour 2.5": "toy",
    "supmae doctor --data DIR --price-per-gpu-hour 2.5": "help",
    "supmae bench table1 --device cuda --gpus 8": "help",
    "supmae bench step --device cuda --batch-size 256": "help",
    "supmae bench loaders --data DIR": "help",
    "supmae bench convert --src DIR --archives": "help",
    "bash benchmarks/gpu_check.sh": "dry",
    "nvidia-smi": "skip",
    "make setup": "run",
    '.venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"':
        "run",
}


def sh(command: str, cwd: str = REPO, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    """`command` in bash after the README's `source .venv/bin/activate`; its output, exit 0 required."""
    full = f"source {shlex.quote(os.path.join(VENV_BIN, 'activate'))} && {command}"
    proc = subprocess.run(["bash", "-c", full], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **(env or {})), check=False)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_every_readme_command_has_a_plan_and_every_plan_is_in_the_readme():
    commands = [c for _, c in readme_commands()]
    missing = [c for c in commands if c not in PLAN]
    assert not missing, f"README commands with no entry in tests/test_readme.py's PLAN: {missing}"
    gone = [c for c in PLAN if c not in commands]
    assert not gone, f"PLAN entries the README no longer has: {gone}"


pytestmark = pytest.mark.skipif(not os.path.isdir(VENV_BIN), reason="no .venv (run make setup)")


def _help_command(command: str) -> str:
    """The subcommand's --help: `supmae X [Y] --help`, `torchrun ... -m supmae.cli X --help`."""
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = ["supmae", words[words.index("supmae.cli") + 1]]
    elif words[1] == "bench":
        words = words[:3]
    else:
        words = words[:2]
    return " ".join([*words, "--help"])


def test_help_commands(capsys):
    """Each "help" command's subcommand, in this process (a shell per command costs seconds of imports)."""
    from supmae.cli import main

    for command in [c for c, how in PLAN.items() if how == "help"]:
        argv = shlex.split(_help_command(command))[1:]
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code in (0, None), command
        assert "usage" in capsys.readouterr().out.lower(), command


@pytest.mark.parametrize("command", [c for c, how in PLAN.items() if how == "run"])
def test_run_as_written(command):
    sh(command)


def test_dry_runs():
    assert "supmae demo" in sh("make -n demo") and "pytest" in sh("make -n test")
    assert "usage" in sh("supmae demo --help").lower()
    out = sh("bash benchmarks/gpu_check.sh", env={"GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_DRY_RUN": "1"})
    assert "supmae.cli pretrain" in out and "supmae.cli doctor" in out


def test_activation_puts_the_commands_on_the_path():
    found = [os.path.realpath(p) for p in sh("command -v supmae torchrun").split()]
    # Real paths: a .venv that is a link to another folder activates under that folder's name.
    assert found == [os.path.realpath(os.path.join(VENV_BIN, n)) for n in ("supmae", "torchrun")], found


# ---------------------------------------------------------------------------------------- toy size

TOY_TRAIN = "--recipe tiny_cpu --train.epochs 1 --train.planned_epochs 1 --data.batch_size 16 --data.num_workers 1"


def toy(command: str, paths: dict[str, str]) -> str:
    """The README's command at toy size: its example paths mapped, workers cut, ViT-B replaced."""
    for old, new in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        command = command.replace(old, new)
    command = command.replace("--workers 16", "--workers 2").replace("--nproc_per_node 8", "--nproc_per_node 2")
    return command.replace("--recipe supmae_vit_b16_400ep", TOY_TRAIN)


@pytest.fixture(scope="module")
def toy_paths(tmp_path_factory):
    from tools.synthetic import make_dataset

    base = tmp_path_factory.mktemp("readme")
    raw = make_dataset(str(base / "imagenet"), train_per_class=6, val_per_class=2, size=40, seed=0)
    return {"~/Downloads/imagenet": raw, "SRC": raw, "/data/imagenet-256": str(base / "in256"),
            "OUT": str(base / "out"), "/scratch/in256": str(base / "in256s"), "runs/": str(base / "runs") + "/",
            "/shared/runs/": str(base / "shared") + "/", "RUN_DIR": "runs/supmae400",  # then mapped by "runs/"
            "{0..15}": "{0..1}"}


@pytest.fixture(scope="module")
def toy_converted(toy_paths) -> str:
    """The README's /data/imagenet-256 for the training blocks: the conversion test's output when it ran
    first in this process, else converted here."""
    from tools.convert import convert

    data = toy_paths["/data/imagenet-256"]
    if not os.path.isdir(data):
        convert(toy_paths["SRC"], data, max_res=256, workers=2, progress=False)
    return data


@pytest.mark.slow
def test_toy_conversions(toy_paths):
    """Blocks 2 (step 1), 4 and 5: convert, verify, two SLURM parts and their merge."""
    plan = [c for c, how in PLAN.items() if how == "toy" and c.startswith("supmae convert")]
    first = next(c for c in plan if "~/Downloads/imagenet /data" in c)
    sh(toy(first, toy_paths))
    assert os.path.isfile(os.path.join(toy_paths["/data/imagenet-256"], "manifest.json"))
    sh(toy(next(c for c in plan if c.startswith("supmae convert SRC OUT")), toy_paths))
    sh(toy("supmae convert --verify OUT", toy_paths))
    shard = next(c for c in plan if "--shard" in c)
    for task in (0, 1):
        sh(toy(shard, toy_paths), env={"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2",
                                      "SLURM_CPUS_PER_TASK": "1"})
    merged = toy_paths["/data/imagenet-256"] + "-merged"
    sh(toy(next(c for c in plan if "--merge" in c), {**toy_paths, "/data/imagenet-256": merged}))
    assert os.path.isfile(os.path.join(merged, "manifest.json"))


@pytest.mark.slow
def test_toy_guide_pretrain_report_doctor(toy_paths, toy_converted):
    """Block 2 steps 2, 3, 5 and block 9's report: the doctor (data-sheet step), torchrun on 2 ranks, the report."""
    data = toy_converted
    doctor = next(c for c in PLAN if c.startswith("supmae doctor --data /data"))
    sh(toy(doctor, toy_paths) + " --pipelines ffcv --workers 1 --seconds 0.3 --data.batch_size 16 --out "
       + shlex.quote(os.path.join(os.path.dirname(data), "doctor")))
    pretrain = next(c for c in PLAN if c.startswith("torchrun --nproc_per_node 8 -m supmae.cli pretrain"))
    sh(toy(pretrain, toy_paths), env={"MASTER_PORT": str(free_port())})
    run = os.path.join(toy_paths["runs/"], "supmae400")
    assert os.path.isfile(os.path.join(run, "checkpoint-last.pth"))
    for report in ("supmae report runs/supmae400 --price-per-gpu-hour 2.5", "supmae report RUN_DIR --price-per-gpu-hour 2.5"):
        sh(toy(report, toy_paths))
    assert os.path.isfile(os.path.join(run, "report.md"))


@pytest.mark.slow
@pytest.mark.usefixtures("toy_converted")
def test_toy_two_nodes(toy_paths):
    """Block 3: the multi-node line on two agents of this machine (HEAD = 127.0.0.1), one rank each."""
    line = next(c for c in PLAN if c.startswith("torchrun --nnodes 2"))
    command = toy(line, toy_paths).replace("--nproc_per_node 2", "--nproc_per_node 1")
    command = command.replace("HEAD:29500", f"127.0.0.1:{free_port()}")
    activate = f"source {shlex.quote(os.path.join(VENV_BIN, 'activate'))} && "
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    agents = [subprocess.Popen(["bash", "-c", activate + command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert os.path.isfile(os.path.join(toy_paths["/shared/runs/"], "supmae400", "checkpoint-last.pth"))


def test_an_unavailable_default_pipeline_names_the_one_that_works(monkeypatch):
    """Block 2 step 4's note: vit_b16_ft100 reads with dali; without DALI the job stops in one line naming
    torchvision (ffcv refuses RandAugment). DALI's absence is made real for the import system."""
    from supmae.errors import UserError
    from supmae.recipes import get_recipe

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    cfg = get_recipe("vit_b16_ft100", "finetune")
    assert cfg.data.pipeline == "dali" and cfg.data.randaugment
    with pytest.raises(UserError) as err:
        cfg.data.check_available()
    msg = str(err.value)
    assert "\n" not in msg and "the dali pipeline is unavailable here" in msg
    assert "use --data.pipeline torchvision" in msg and "ffcv" not in msg.split("use ")[1]
