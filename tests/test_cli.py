"""The `lightning-xai` CLI runs the shipped YAML configs end to end (fast_dev_run, tiny data)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from lightning_xai.callbacks import ExplanationMonitor
from lightning_xai.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "configs", "quickstart.yaml")
CONSOLE = os.path.join(os.path.dirname(sys.executable), "lightning-xai")
TINY_DATA = [
    "--data.init_args.n_train=32",
    "--data.init_args.n_val=16",
    "--data.init_args.n_test=16",
    "--data.init_args.image_size=32",
    "--data.init_args.batch_size=16",
]


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """The shipped configs write to relative paths (runs/...): keep them inside the test's folder."""
    monkeypatch.chdir(tmp_path)


def grid_pngs(root) -> list[str]:
    """The explanation-grid PNG files anywhere under ``root`` (the callback chooses the sub-folder)."""
    return [p for p in glob.glob(os.path.join(str(root), "**", "*.png"), recursive=True) if "explanations" in p]


def read_config(config: str) -> dict:
    with open(os.path.join(ROOT, "examples", "configs", config), encoding="utf-8") as f:
        return yaml.safe_load(f)


def model_fixes_image_size(config: str) -> bool:
    """Whether the config's model is built for one image size (a ViT: its position embeddings fix the token
    count), so that the data's image size must stay the config's."""
    return "image_size" in (read_config(config)["model"].get("init_args") or {})


def tiny_data(config: str) -> list[str]:
    """Tiny-data overrides for a shipped config: sizes and batch always; the image size (32 px) only where the
    model does not fix it - overriding it there would test a run the config does not allow."""
    image_size = [] if model_fixes_image_size(config) else ["--data.init_args.image_size=32"]
    return [a for a in TINY_DATA if "image_size" not in a] + image_size


def fit_tiny(config: str, tmp_path):
    """``lightning-xai fit`` of a shipped config under ``fast_dev_run`` on tiny generated data, without a logger."""
    return main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "examples", "configs", config),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            *tiny_data(config),
        ]
    )


def test_quickstart_config_fast_dev_run(tmp_path):
    cli = fit_tiny("quickstart.yaml", tmp_path)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert list(monitor.attributors) == ["saliency", "integrated_gradients", "gradcam", "gradcam_plus_plus"]
    assert monitor.attributors["integrated_gradients"].steps == 32
    assert not monitor.errors, monitor.errors
    assert grid_pngs(tmp_path), "the explanation grid is written under default_root_dir"


def console(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed ``lightning-xai`` console script (as a user does) in ``cwd``."""
    if not os.path.exists(CONSOLE):
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"the console script is not installed at {CONSOLE} (pip install -e .)")
        pytest.skip("the console script is not installed in this environment")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([CONSOLE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_console_script_help():
    out = console(["fit", "--help"], cwd=ROOT, timeout=120)
    assert out.returncode == 0
    assert "--config" in out.stdout


def test_console_script_exits_0_after_a_run_and_prints_no_object_repr(tmp_path):
    out = console(["fit", "--config", QUICKSTART, "--trainer.fast_dev_run=true", "--trainer.logger=false", *TINY_DATA],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert "LightningCLI object" not in printed and "<lightning" not in printed, printed[-2000:]
    assert grid_pngs(tmp_path / "runs" / "quickstart"), "the grid is written under the config's default_root_dir"


def test_console_script_exits_non_zero_on_failure(tmp_path):
    bad_attributor = console(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--trainer.callbacks=[{class_path: lightning_xai.callbacks.ExplanationMonitor, "
            "init_args: {attributors: [gradcamm]}}]",
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            *TINY_DATA,
        ],
        cwd=tmp_path,
    )
    assert bad_attributor.returncode == 1, bad_attributor.stderr[-3000:]
    assert "unknown attributor 'gradcamm'" in bad_attributor.stderr
    assert "Traceback" in bad_attributor.stderr, "a failure shows where it happened"


def test_console_main_returns_0_and_argument_errors_exit_2(tmp_path, capsys):
    """The console script's function, in process (the subprocess tests above cover the installed script)."""
    from lightning_xai.cli import console_main

    assert console_main(["fit", "--config", QUICKSTART, "--trainer.fast_dev_run=true", "--trainer.logger=false",
                         f"--trainer.default_root_dir={tmp_path}", *TINY_DATA]) == 0
    with pytest.raises(SystemExit) as exit_info:
        console_main(["fit", "--config", QUICKSTART, "--trainer.no_such_option=1"])
    assert exit_info.value.code == 2
    assert "no_such_option" in capsys.readouterr().err


def readme_cli_commands() -> list[list[str]]:
    """Every ``lightning-xai ...`` line of the README's bash blocks, split as a shell would."""
    import re
    import shlex

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("lightning-xai ")]


def test_readme_fit_then_validate_from_last_ckpt(tmp_path):
    """The README's CLI commands, extracted from the README and run as written (with tiny data and a short run
    appended; the paths in quickstart.yaml are relative to the working directory): fit writes
    ``runs/quickstart/checkpoints/last.ckpt`` and validate loads it."""
    commands = readme_cli_commands()
    assert [c[1] for c in commands] == ["fit", "validate"], commands
    short = {"fit": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"],
             "validate": ["--trainer.limit_val_batches=1"]}
    for command in commands:
        args = [os.path.join(ROOT, a) if a.startswith("examples/") else a for a in command[1:]]
        done = console([*args, *short[command[1]], *TINY_DATA], cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr[-3000:])
        if command[1] == "fit":
            ckpt = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
            assert ckpt.is_file(), sorted(str(p) for p in tmp_path.rglob("*.ckpt"))
        else:
            assert "val" in done.stdout + done.stderr


def test_bad_attributor_name_in_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown attributor 'gradcamm'; did you mean \['gradcam'"):
        main(
            [
                "fit",
                "--config",
                os.path.join(ROOT, "examples", "configs", "quickstart.yaml"),
                "--trainer.callbacks=[{class_path: lightning_xai.callbacks.ExplanationMonitor, "
                "init_args: {attributors: [gradcamm]}}]",
                "--trainer.fast_dev_run=true",
                "--trainer.logger=false",
            ]
        )


def test_explanation_quality_config_fast_dev_run(tmp_path):
    """The ground-truth config trains, scores every configured method and metric, and runs the sanity check."""
    from lightning_xai.callbacks import ExplanationQuality, SanityCheck

    cli = fit_tiny("explanation_quality.yaml", tmp_path)
    (quality,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationQuality)]
    (sanity,) = [c for c in cli.trainer.callbacks if isinstance(c, SanityCheck)]
    assert len(quality.history) == 1
    values = quality.history[0][1]
    for method in ("saliency", "integrated_gradients", "gradcam", "lrp"):
        for metric in ("mask_iou", "pointing_game", "relevance_mass", "deletion_auc", "insertion_auc"):
            key = next(k for k in values if method in k and k.endswith(metric))
            assert 0.0 <= values[key] <= 1.0, (key, values[key])
    assert set(sanity.results) == {"saliency", "gradcam"}
    assert all(isinstance(r["passes"], bool) for r in sanity.results.values())


SHIPPED = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))


def test_vit_config_trains_and_scores_the_transformer_methods(tmp_path):
    """The ViT config: the monitor explains with the three transformer methods, ExplanationQuality scores every
    method and metric in [0, 1] (Grad-CAM on a token layer included), and nothing fails."""
    from lightning_xai.callbacks import ExplanationQuality
    from lightning_xai.models import ViTClassifier

    assert model_fixes_image_size("vit_explanations.yaml")
    assert "--data.init_args.image_size=32" not in tiny_data("vit_explanations.yaml")
    cli = fit_tiny("vit_explanations.yaml", tmp_path)
    assert isinstance(cli.model, ViTClassifier)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationMonitor)]
    (quality,) = [c for c in cli.trainer.callbacks if isinstance(c, ExplanationQuality)]
    assert list(monitor.attributors) == ["attention_rollout", "transformer_attribution", "attnlrp"]
    assert not monitor.errors and not quality.errors, (monitor.errors, quality.errors)
    assert grid_pngs(tmp_path), "the explanation grid is written under default_root_dir"
    values = quality.history[0][1]
    for method in ("attention_rollout", "transformer_attribution", "attnlrp", "gradcam"):
        for metric in ("mask_iou", "pointing_game", "relevance_mass", "deletion_auc", "insertion_auc"):
            key = next(k for k in values if method in k and k.endswith(metric))
            assert 0.0 <= values[key] <= 1.0, (key, values[key])


def test_a_model_with_a_fixed_image_size_gets_data_of_that_size():
    """Every config whose model fixes the image size (a ViT) gives its data the same size: else the first
    forward pass fails."""
    fixed = [c for c in SHIPPED if model_fixes_image_size(c)]
    assert "vit_explanations.yaml" in fixed
    for config in fixed:
        cfg = read_config(config)
        assert cfg["model"]["init_args"]["image_size"] == cfg["data"]["init_args"]["image_size"], config


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_runs_under_fast_dev_run(config, tmp_path):
    """Generated from the folder: a config added to examples/configs is tested without a new test."""
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "examples", "configs", config),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.state.finished, cli.trainer.state
    for callback in cli.trainer.callbacks:
        errors = getattr(callback, "errors", None)
        assert not errors, (config, type(callback).__name__, [str(e) for e in errors])
