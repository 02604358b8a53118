import re

import pytest
import torch

from job.errors import SettingsError
from job.settings import Settings, help_text, load_settings, settings_markdown
from tests.helpers import REPO, job_env, run_job


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    return info.value.problems


def test_defaults_are_valid_and_name_the_run_after_the_config():
    s = load_settings({})
    assert s.dataset == "fashion-mnist" and s.resolved_image_size == 28
    assert s.resolved_run_id == "fashion-mnist-dcgan"
    assert load_settings({"GAN_CONDITIONAL": "true", "GAN_MODEL": "mlp"}).resolved_run_id == (
        "fashion-mnist-mlp-cond"
    )


def test_every_bad_variable_gets_its_own_line_naming_value_and_expectation():
    lines = problems(
        {"GAN_BATCH_SIZE": "lots", "GAN_MODEL": "vae", "GAN_LR_D": "-1", "GAN_DEVICE": "tpu"}
    )
    assert len(lines) == 4
    text = "\n".join(lines)
    assert "GAN_BATCH_SIZE='lots': expected an integer" in text
    assert "GAN_MODEL='vae': expected one of 'mlp' or 'dcgan'" in text
    assert "GAN_LR_D='-1': expected a number > 0" in text
    assert "GAN_DEVICE='tpu'" in text


def test_unknown_gan_variable_is_reported_as_a_typo():
    assert problems({"GAN_MAX_STEP": "10"}) == [
        "GAN_MAX_STEP: unknown setting (a typo?); see `gan-job --help` for the list"
    ]


def test_kubernetes_service_link_variables_are_not_typos():
    env = {
        "GAN_SERVICE_HOST": "10.0.0.1",
        "GAN_SERVICE_PORT": "80",
        "GAN_PORT": "tcp://10.0.0.1:80",
        "GAN_PORT_80_TCP_ADDR": "10.0.0.1",
        "GAN_WORKERS_SERVICE_PORT_HTTP": "80",
    }
    assert load_settings(env).dataset == "fashion-mnist"


def test_a_service_link_landing_on_a_real_setting_explains_itself():
    (line,) = problems({"GAN_METRICS_PORT": "tcp://10.0.0.3:9090"})
    assert "enableServiceLinks: false" in line


def test_dcgan_refuses_image_sizes_it_cannot_build():
    (line,) = problems({"GAN_IMAGE_SIZE": "48"})
    assert "GAN_IMAGE_SIZE=48" in line and "28, 32, 64" in line
    assert load_settings({"GAN_IMAGE_SIZE": "48", "GAN_MODEL": "mlp"}).resolved_image_size == 48


def test_unknown_dataset_lists_the_supported_ones():
    (line,) = problems({"GAN_DATASET": "imagenet"})
    assert "GAN_DATASET='imagenet'" in line and "folder:/path" in line


def test_invalid_settings_exit_2_before_any_work(tmp_path):
    env = job_env(tmp_path, GAN_BATCH_SIZE="0", GAN_TYPO="1")
    result = run_job(env, timeout=60)
    assert result.returncode == 2
    assert "GAN_BATCH_SIZE='0'" in result.stdout and "GAN_TYPO" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_setting():
    text = help_text()
    for name in Settings.model_fields:
        assert f"GAN_{name.upper()}" in text


def test_readme_settings_table_matches_the_code():
    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert table, "README.md lacks the generated settings table"
    assert table.group(1).strip() == settings_markdown().strip(), (
        "README settings table is stale: regenerate with `python -m job.settings`"
    )


def test_settings_table_rows_have_four_cells_and_name_optional_types():
    rows = settings_markdown().splitlines()
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 4, row
        assert cells[3].strip(), f"no description: {row}"
    (image_size,) = [r for r in rows if r.startswith("| `GAN_IMAGE_SIZE`")]
    assert "| int, optional |" in image_size and "pixels per side" in image_size
    (model,) = [r for r in rows if r.startswith("| `GAN_MODEL`")]
    assert "| one of mlp, dcgan |" in model


def test_nproc_per_node_auto_is_one_process_per_visible_gpu_and_one_on_cpu():
    gpus = torch.cuda.device_count()
    assert load_settings({"GAN_NPROC_PER_NODE": "auto"}).nproc_per_node == max(gpus, 1)
    assert load_settings({"GAN_NPROC_PER_NODE": "auto", "GAN_DEVICE": "cpu"}).nproc_per_node == 1
    assert load_settings({"GAN_NPROC_PER_NODE": "3"}).nproc_per_node == 3
    (line,) = problems({"GAN_NPROC_PER_NODE": "all"})
    assert line.startswith("GAN_NPROC_PER_NODE='all': expected an integer or auto")
