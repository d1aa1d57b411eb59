"""Text encoders: the offline t5-tiny-random goes through the real T5EncoderModel path."""
import pytest
import torch

from imagen_ds.errors import ConfigError
from imagen_ds.text import expected_dim, load_encoder

CAPTIONS = ["a red circle on a blue background", "a blue circle on a red background", ""]


def test_tiny_random_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_encoder("t5-tiny-random")
    assert torch.equal(torch.get_rng_state(), state)
    b = load_encoder("t5-tiny-random")
    ea, ma = a.encode(CAPTIONS, 64)
    eb, mb = b.encode(CAPTIONS, 64)
    assert torch.equal(ea, eb) and torch.equal(ma, mb)
    assert a.dim == expected_dim("t5-tiny-random") == 64 and a.name == "t5-tiny-random"
    assert type(a.model).__name__ == "T5EncoderModel"


def test_mask_marks_the_valid_tokens_and_padding_is_zero():
    enc = load_encoder("t5-tiny-random")
    emb, mask = enc.encode(CAPTIONS + ["x" * 200], 64)
    assert emb.shape == (4, 64, 64) and emb.dtype == torch.float32 and mask.dtype == torch.bool
    # byte-level tokens: one per UTF-8 byte plus the end-of-sequence token; truncated at max_tokens
    assert mask.sum(1).tolist() == [len(CAPTIONS[0]) + 1, len(CAPTIONS[1]) + 1, 1, 64]
    assert mask[0, : len(CAPTIONS[0]) + 1].all()
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()
    # word order matters: the two captions swap colours and must not embed alike
    assert (emb[0] - emb[1])[mask[0]].abs().mean() > 0.05


def test_encoding_a_caption_alone_or_in_a_batch_agrees():
    enc = load_encoder("t5-tiny-random")
    batch, _ = enc.encode(CAPTIONS, 64)
    alone, _ = enc.encode(CAPTIONS[1:2], 64)
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=1e-5)


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown encoder"):
        load_encoder("t5-nonexistent")
    assert expected_dim("t5-11b") == 1024 and expected_dim("t5-v1_1-xxl") == expected_dim("t5-xxl") == 4096


def test_tiny_random_tells_which_word_a_colour_belongs_to():
    # the demo's captions swap colours between shape and background; a byte's state must depend
    # on its neighbours (as in a trained T5) or the two captions read the same
    enc = load_encoder("t5-tiny-random")
    caps = ["a blue circle on a white background", "a white circle on a blue background"]
    emb, _ = enc.encode(caps, 64)
    same_word = torch.nn.functional.cosine_similarity(emb[0, caps[0].index("blue")],
                                                      emb[1, caps[1].index("blue")], dim=0)
    other_word = torch.nn.functional.cosine_similarity(emb[0, caps[0].index("blue")],
                                                       emb[0, caps[0].index("white")], dim=0)
    assert same_word < 0.95  # the default random T5 init gives 0.999 here
    assert other_word < same_word  # a different letter is still further away than a moved one
