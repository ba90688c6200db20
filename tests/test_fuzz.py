"""Bad overrides, generated: each one is answered by the CLI's checking function with exit code 2 and one error line,
never a traceback. The cases come from a seeded generator (wrong options, misspelt keys at every depth, wrong types,
out-of-range and huge numbers, malformed grammar, empty values, unicode, lists where scalars go, sweeps with one bad
choice, keys that do not apply, keys an option fixes); they run in-process through :func:`cvlab.cli.check`, and a
handful through the real `cvlab` command."""
from __future__ import annotations

import random
import string

import pytest
from omegaconf import OmegaConf

from cvlab.cli import check, complete_task
from cvlab.utils.config import compose, groups, options

SEED = 20240610
CASES = 240  # the fast run; the slow one draws SLOW_CASES from another seed
SLOW_CASES = 2000


def refusal(capsys, config_name: str, overrides: list[str]) -> str | None:
    """Runs the CLI's checking function as `cvlab <config_name>` does; returns its one error line when it refuses
    (exit code 2), None when it accepts. Fails the test on anything else: another exit code, several lines, an
    exception (a traceback)."""
    capsys.readouterr()
    try:
        # What `cvlab train` does before checking: model=NAME picks its task and that task's default data.
        check(config_name, complete_task(overrides) if config_name == "train" else overrides)
    except SystemExit as stop:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert stop.code == 2, (overrides, stop.code, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (overrides, err)
        assert "Traceback" not in err
        return lines[0]
    return None


# ------------------------------------------------------------------------------------------------- the generator
def _leaves(node, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every leaf of a composed config (values as written, interpolations unresolved)."""
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        child = node._get_node(key)
        if OmegaConf.is_dict(child) and not child._is_interpolation() and not child._is_none():
            found += _leaves(child, f"{path}.")
        else:
            found.append((path, None if child._is_missing() else child._value()))
    return found


def _misspell(rng: random.Random, word: str) -> str:
    """One edit: a letter dropped, doubled, swapped with the next, or replaced."""
    i = rng.randrange(len(word))
    edit = rng.randrange(4)
    if edit == 0 and len(word) > 1:
        return word[:i] + word[i + 1:]
    if edit == 1:
        return word[:i] + word[i] + word[i:]
    if edit == 2 and i < len(word) - 1 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + rng.choice([c for c in string.ascii_lowercase if c != word[i]]) + word[i + 1:]


# (key, values no setting of it may take) on the default config (digits, resnet18, adamw, trainer=default).
OUT_OF_RANGE = {
    "optimizer.lr": [-1, 0, -1e-3, "inf", "nan", "-inf"],
    "optimizer.weight_decay": [-0.1, "nan"],
    "optimizer.betas": ["[1.5,0.999]", "[0.9]", "[-0.1,0.9]"],
    "data.batch_size": [0, -5, 10**12],
    "data.num_workers": [-1, 10**6],
    "data.val_fraction": [1.5, 0, -0.1, 1, 0.9],
    "data.test_fraction": [1.0, -0.5, 0.95],
    "data.image_size": [0, -1, 10**5],
    "data.in_chans": [0, 3, 100],
    "data.num_classes": [0, -3, 9, 1000],
    "seed": [-1, 2**40, 10**30],
    "trainer.max_epochs": [-2, -100],
    "trainer.max_steps": [-5],
    "trainer.limit_train_batches": [1.5, -1, -0.5],
    "trainer.limit_val_batches": [2.5, -2],
    "trainer.accumulate_grad_batches": [0, -1],
    "trainer.gradient_clip_val": [-1, "nan"],
    "trainer.log_every_n_steps": [-1],
    "trainer.num_sanity_val_steps": [-5],
    "trainer.check_val_every_n_epoch": [0],
    "trainer.precision": [17, "half", "bf17-mixed"],
    "trainer.accelerator": ["tpuu", "quantum"],
    "trainer.gradient_clip_algorithm": ["max"],
    "trainer.val_check_interval": [0, -1, 1.5],
}
WRONG_TYPES = ["abc", "[1,2]", "{a:1}", "true", "''", "[]", "resnet18", "1.5.2"]
GRAMMAR = ["model=", "=resnet18", "model==resnet18", "data.batch_size=[1,", "optimizer.lr=(", "trainer.max_epochs={",
           "=", "model=resnet18,", "++", "~", "model=[resnet18", "optimizer.lr=1e-3)", "data.=3", ".data=3",
           "data..batch_size=3", "model=resnet18]", "optimizer.lr=choice(", "seed=1 2", "a b=c", "trainer.max_epochs=}",
           "model=\"resnet18", "optimizer=sgd'"]
UNICODE = ["modèl=resnet18", "model=résnet18", "optimizer.lr=１", "data.batch_size=٣", "model=resnet18🙂",
           "données.batch_size=4", "optimizer=ädam", "trainer.max_epochs=五"]
EMPTY = ["data.batch_size=", "optimizer.lr=", "optimizer.lr=''", "model=''", "trainer.max_epochs=", "seed=", "data=",
         "trainer.precision=''", "norm=''"]
# Keys that exist for some option but not the chosen one, keys an option fixes, keys cvlab sets itself.
MISPLACED = ["data.root=/tmp", "data.download=true", "data=shapes data.val_fraction=0.2",
             "data=synthetic data.test_fraction=0.2", "data=cifar10 data.test_fraction=0.2", "data.train_size=10",
             "data.n_objects=[1,2]", "data.class_names=[a,b]", "data.name=mine", "data.source=shapes",
             "model.name=resnet50", "model.task=detection", "task.name=detection", "optimizer._target_=os.system",
             "data._target_=builtins.open", "trainer._target_=builtins.exec", "trainer.logger=false",
             "trainer.callbacks=[]", "trainer.default_root_dir=/tmp", "trainer.enable_model_summary=true",
             "optimizer.params=[]", "+data.foo=1", "+model.foo=1", "+trainer.foo=1", "+optimizer.foo=1",
             "~data.foo", "~optimizer.momentum", "optimizer.lr=interval(0.001,0.1)", "data.batch_size=glob(*)",
             "trainer.max_stepz=2", "trainer.limit_train_batchez=0.1", "model=yolov3_tiny data=digits",
             "data=coco", "data=imagefolder", "data=imagefolder data.root=/nonexistent/images",
             "data=shapes_det data.n_objects=[3,1]", "data=shapes_det data.scale=[2,1]",
             "data=shapes_det data.hflip=1.5", "data=shapes_det data.augment=false data.hflip=0.2",
             "data=shapes data.in_chans=1", "data=synthetic data.num_classes=0", "data=shapes data.train_size=0",
             "paths.runs=/proc/cvlab-runs", "paths.runs=/etc/hostname/runs",
             "scheduler=step scheduler.scheduler.gamma=-1",
             "optimizer=sgd optimizer.momentum=-0.5", "optimizer=adam optimizer.eps=-1"]
PREDICT_BAD = ["top_k=0", "top_k=-1", "top_k=abc", "conf=1.5", "conf=-0.1", "device=cuda:99", "device=gpu0",
               "device=tpu", "device=", "top_k=[1]", "conf=nan"]
# Good overrides to pad a bad one with, so that the bad one is found among others.
GOOD = ["model=resnet34", "optimizer=sgd", "optimizer.lr=0.01", "data.batch_size=32", "trainer.max_epochs=2",
        "norm=gn", "activation=mish", "seed=7", "trainer.max_steps=3", "trainer.gradient_clip_val=1.0"]


def generate(seed: int, count: int) -> list[tuple[str, list[str]]]:
    """``count`` bad override sets, ``(config name, overrides)``, the same for the same seed."""
    rng = random.Random(seed)
    base = compose("train", [])
    leaves = [(key, value) for key, value in _leaves(base)
              if not key.startswith(("hydra", "paths.output_dir")) and not str(key).split(".")[-1].startswith("_")]
    group_names = groups()
    valid_keys = {key for key, _ in leaves}

    def wrong_option() -> list[str]:
        group = rng.choice(group_names)
        valid = options(group)
        value = _misspell(rng, rng.choice(valid)) if valid and rng.random() < 0.8 else "".join(
            rng.choices(string.ascii_lowercase + "_", k=rng.randint(1, 12)))
        return [f"{group}={value}"] if value not in valid else wrong_option()

    def misspelt_key() -> list[str]:
        key, value = rng.choice(leaves)
        parts = key.split(".")
        depth = rng.randrange(len(parts))
        parts[depth] = _misspell(rng, parts[depth])
        bad = ".".join(parts)
        if bad in valid_keys or bad.split(".")[0] in group_names and len(parts) == 1:
            return misspelt_key()
        return [f"{bad}={value if isinstance(value, (bool, int, float)) else 1}"]

    def wrong_type() -> list[str]:
        key, value = rng.choice([(k, v) for k, v in leaves if isinstance(v, (bool, int, float))])
        bad = rng.choice([t for t in WRONG_TYPES if t != "true" or not isinstance(value, bool)])
        return [f"{key}={bad}"]

    def out_of_range() -> list[str]:
        key = rng.choice(sorted(OUT_OF_RANGE))
        return [f"{key}={rng.choice(OUT_OF_RANGE[key])}"]

    def huge() -> list[str]:
        key = rng.choice(["data.batch_size", "data.image_size", "seed", "data.num_workers", "data.in_chans"])
        return [f"{key}={rng.choice(['9' * 40, '1e400', '-1e400', str(2**63), str(10**18)])}"]

    def list_for_scalar() -> list[str]:
        key, _ = rng.choice([(k, v) for k, v in leaves if isinstance(v, (int, float)) and not isinstance(v, bool)])
        return [f"{key}={rng.choice(['[1]', '[1,2,3]', '[]', '[[1]]', '{x:1}'])}"]

    def bad_sweep() -> list[str]:
        key = rng.choice(sorted(OUT_OF_RANGE))
        good = {"optimizer.lr": "0.01", "data.batch_size": "16", "data.val_fraction": "0.2", "seed": "3",
                "trainer.max_epochs": "2"}.get(key)
        if good is None:
            group = rng.choice(["model", "optimizer", "norm", "activation", "data"])
            valid = options(group)
            bad = _misspell(rng, rng.choice(valid))
            return [f"{group}={','.join(rng.sample(valid, 2) + ([bad] if bad not in valid else ['nosuch']))}"]
        return [f"{key}={good},{rng.choice(OUT_OF_RANGE[key])}"]

    def from_list(items: list[str]):
        return lambda: rng.choice(items).split(" ")

    makers = [wrong_option, misspelt_key, wrong_type, out_of_range, huge, list_for_scalar, bad_sweep,
              from_list(GRAMMAR), from_list(UNICODE), from_list(EMPTY), from_list(MISPLACED)]
    cases = []
    for index in range(count):
        if index % 12 == 11:
            cases.append(("predict", ["ckpt=x.ckpt", "source=.", rng.choice(PREDICT_BAD)]))
            continue
        bad = makers[index % len(makers)]()
        touched = {o.lstrip("+~").partition("=")[0].split(".")[0] for o in bad}
        padding = [o for o in rng.sample(GOOD, rng.randint(0, 2)) if o.partition("=")[0].split(".")[0] not in touched]
        cases.append(("train", padding + bad if rng.random() < 0.5 else bad + padding))
    return cases


def _accepted(capsys, cases) -> list:
    """The cases the CLI's check let through (each one was meant to be refused)."""
    return [case for case in cases if refusal(capsys, *case) is None]


def test_the_generator_is_deterministic_and_covers_every_kind():
    first, again = generate(SEED, CASES), generate(SEED, CASES)
    assert first == again and len(first) == CASES >= 200
    flat = [o for _, overrides in first for o in overrides]
    assert any("," in o and "=" in o for o in flat)                 # sweeps
    assert any(not o.isascii() for o in flat)                      # unicode
    assert any(o.endswith("=") for o in flat)                      # empty values
    assert sum(config == "predict" for config, _ in first) >= 15


def test_every_generated_bad_override_is_one_line_exit_2(capsys):
    assert _accepted(capsys, generate(SEED, CASES)) == []


@pytest.mark.slow
def test_a_long_fuzz_run_is_one_line_exit_2(capsys):
    assert _accepted(capsys, generate(SEED + 1, SLOW_CASES)) == []


# A handful through the real command (a wrong option, a misspelt nested key, a wrong type, bad grammar, unicode, a
# predict value): the same one line, and no run directory left.
@pytest.mark.parametrize("index", [0, 1, 2, 7, 8, 11])
def test_generated_cases_through_the_real_cli(cli_here, tmp_path, index):
    command, overrides = generate(SEED, CASES)[index]
    (tmp_path / "x.ckpt").write_bytes(b"")  # predict's ckpt= must exist before its values are checked
    result = cli_here(command, *overrides)
    assert result.returncode == 2, (overrides, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (overrides, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
