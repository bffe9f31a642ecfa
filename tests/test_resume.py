"""Resume with randomness: a run killed after an epoch and resumed gives exactly the history and
the weights of an uninterrupted run, also where every step draws random numbers (the teacher's
logit noise, gkd's choice of on-policy batches and the student's samples, LoRA dropout)."""

import pytest
import torch
from safetensors.torch import load_file
from test_training import mix  # noqa: F401 (the training tests' examples, a fixture)

from kd_utils import models, teachers, training
from kd_utils.training import TrainConfig


class Killed(Exception):
    pass


def kill_after_epoch(epoch: int) -> None:
    if epoch == 1:
        raise Killed()


@pytest.fixture(scope="module")
def student_dir(tiny_model_dir, tmp_path_factory):
    return models.build_student_dir(tiny_model_dir, 1, tmp_path_factory.mktemp("resume") / "student")


def saved_weights(run_dir) -> dict[str, torch.Tensor]:
    return {name: tensor for path in sorted((run_dir / "adapter").glob("*.safetensors"))
            for name, tensor in load_file(path).items()}


@pytest.mark.parametrize("method, overrides", [
    ("fkl", {"noise_sigma": 2.0, "temperature": 2.0}),  # fresh teacher noise at every step
    ("gkd", {"lmbda": 0.5}),  # on-policy batches drawn at random, sampled from the student
], ids=["fkl-noise", "gkd-on-policy"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tiny_model_dir, student_dir, mix, tmp_path, method,
                                                            overrides):
    config = TrainConfig(method=method, epochs=2, batch_size=2, micro_batch_size=1, lr=3e-3, max_length=96,
                         val_fraction=0.25, seed=0, lora=True, lora_r=4, lora_dropout=0.1, gkd_max_new_tokens=6,
                         loss_chunk_size=64, **overrides)

    def run(name: str, **kwargs) -> dict:
        teacher, tok = models.load_model(tiny_model_dir)
        student, _ = models.load_model(student_dir)
        return training.train(student, tok, mix[:8], config, tmp_path / name,
                              teacher=teachers.OnlineTeacher(teacher, tok), **kwargs)

    full = run("full")
    with pytest.raises(Killed):
        run("resumed", on_epoch_end=kill_after_epoch)
    resumed = run("resumed")
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"] == full["history"]  # exactly: every loss, learning rate and step
    assert full["history"][2]["kd_loss"] != full["history"][1]["kd_loss"]
    a, b = saved_weights(tmp_path / "full"), saved_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
