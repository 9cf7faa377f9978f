"""flowact.validate: the checks every stream input passes where it enters (the engine trusts them)."""

import numpy as np
import pytest

from flowact.contract import MAX_PROMPT_BYTES
from flowact.presets import SAMPLES_PER_CHUNK, get_preset
from flowact.validate import InputError, check_audio_chunk, check_image, check_prompt, check_seed

TINY = get_preset("tiny")


@pytest.mark.parametrize("audio, message", [
    (np.zeros(SAMPLES_PER_CHUNK, np.float64), "dtype must be float32"),
    (np.zeros(SAMPLES_PER_CHUNK - 1, np.float32), r"shape must be \(7680,\)"),
    (np.zeros((2, SAMPLES_PER_CHUNK), np.float32), r"shape must be \(7680,\)"),
    (np.full(SAMPLES_PER_CHUNK, np.nan, np.float32), "NaN or Inf"),
    (np.full(SAMPLES_PER_CHUNK, 2e3, np.float32), "magnitude 2e\\+03 is absurd"),
    ([0.0] * SAMPLES_PER_CHUNK, "numpy float32 array"),
])
def test_bad_audio_is_refused(audio, message):
    with pytest.raises(InputError, match=f"^audio: .*{message}"):
        check_audio_chunk(audio)


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 3), np.uint8), r"shape must be \(64, 64, 3\)"),
    (np.zeros((64, 64), np.uint8), "shape must be"),
    (np.zeros((64, 64, 3), np.float32), "dtype must be uint8"),
    ("image.png", "expected a numpy uint8 array"),
])
def test_bad_image_is_refused(image, message):
    with pytest.raises(InputError, match=f"^REF_IMAGE: .*{message}"):
        check_image(image, TINY, "REF_IMAGE")


@pytest.mark.parametrize("seed, message", [
    (-1, "out of range"), (2**63, "out of range"), (1.5, "expected an integer"), (True, "expected an integer"),
    (np.float32(3), "expected an integer"),
])
def test_bad_seed_is_refused(seed, message):
    with pytest.raises(InputError, match=f"^seed: .*{message}"):
        check_seed(seed)


def test_good_inputs_pass_unchanged():
    audio, image = np.zeros(SAMPLES_PER_CHUNK, np.float32), np.zeros((64, 64, 3), np.uint8)
    assert check_audio_chunk(audio) is audio and check_image(image, TINY) is image
    assert check_seed(np.int64(2**63 - 1)) == 2**63 - 1 and type(check_seed(np.int64(5))) is int
    assert check_prompt("x" * MAX_PROMPT_BYTES) == "x" * MAX_PROMPT_BYTES
    with pytest.raises(InputError, match="1025 bytes is longer than 1024"):
        check_prompt("x" * (MAX_PROMPT_BYTES + 1))
    with pytest.raises(InputError, match="expected text"):
        check_prompt(None)
