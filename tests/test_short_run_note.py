"""A run that ends far above the loss its preset reaches on the data says so, and names the reference."""

from ddpm_cli.cli.train import short_run_note
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.training.presets import reference_loss


def _summary(final_loss, **config):
    return {"final_loss": final_loss, "reference_loss": reference_loss(TrainConfig(**config))}


def test_a_short_fashion_mnist_run_gets_a_note_naming_the_reference():
    # 150 steps with the defaults ended at 0.087 on the CPU, with samples of pure noise.
    note = short_run_note(_summary(0.087, data="fashion-mnist", resolution=32))
    assert note is not None and "2.9x the 0.0305" in note and "--max-steps" in note and "built-in fashion-mnist" in note
    assert short_run_note(_summary(0.045, data="fashion-mnist", resolution=32)) is None  # near the reference


def test_no_note_without_a_measured_reference():
    assert reference_loss(TrainConfig(data="./photos", resolution=32)) is None
    assert reference_loss(TrainConfig(data="fashion-mnist", resolution=32, model_size="small")) is None
    assert reference_loss(TrainConfig(data="fashion-mnist", resolution=32, prediction_type="v_prediction")) is None
    assert short_run_note(_summary(0.5, data="./photos", resolution=32)) is None
    assert short_run_note({"final_loss": None, "reference_loss": {"loss": 0.03, "source": "x"}}) is None
