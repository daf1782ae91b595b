"""The CLIP text encoder: parity with transformers on full-size random weights, and behaviour."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_parts import TINY_CLIP, CLIPTextEncoder, CLIPTextOutput, load_text_encoder
from tests.helpers.references import reference_text_encoder

TOL = 1e-4


def assert_matches(encoder, reference, input_ids) -> CLIPTextOutput:
    with torch.inference_mode():
        expected = reference(input_ids, output_hidden_states=True, output_attentions=True)
        out = encoder(input_ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(expected.hidden_states)
    assert len(out.attentions) == len(expected.attentions)
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    for ours, theirs in zip(out.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, atol=TOL, rtol=0)
    return out


def test_matches_transformers(sd_text_encoder_folder):
    reference, folder = sd_text_encoder_folder
    encoder = load_text_encoder(str(folder))
    input_ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    out = assert_matches(encoder, reference, input_ids)
    assert out.last_hidden_state.shape == (2, 77, 768)
    assert len(out.hidden_states) == 13 and len(out.attentions) == 12
    assert out.attentions[0].shape == (2, 12, 77, 77)


def test_hub_prefix_and_position_ids_load(tmp_path):
    """The Hub's files carry ``text_model.`` on every key and often a position_ids buffer."""
    reference = reference_text_encoder(hidden_size=32, intermediate_size=64, layers=2, heads=4)
    folder = tmp_path / "written"
    reference.save_pretrained(folder)
    state = {f"text_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    encoder = load_text_encoder(str(tmp_path))
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368] + [49407] * 71])
    assert_matches(encoder, reference, ids)


def test_full_clip_checkpoint_loads_text_tower(tmp_path):
    """openai/clip-vit-large-patch14 ships the whole CLIP model: only the text tower is taken."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=16),
        projection_dim=16, attn_implementation="eager",
    )
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    encoder = load_text_encoder(str(tmp_path))
    assert encoder.config.hidden_size == 32 and encoder.config.num_hidden_layers == 2
    assert_matches(encoder, full.text_model, torch.randint(0, 49408, (1, 77)))


@pytest.fixture(scope="module")
def tiny_encoder() -> CLIPTextEncoder:
    torch.manual_seed(0)
    return CLIPTextEncoder(TINY_CLIP).eval()


def test_causal_mask(tiny_encoder):
    """Changing token t+1 leaves the outputs at positions 0..t unchanged."""
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % 49408
    with torch.inference_mode():
        a = tiny_encoder(ids).last_hidden_state
        b = tiny_encoder(changed).last_hidden_state
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_attention_path_equals_fast_path(tiny_encoder):
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        fast = tiny_encoder(ids, output_hidden_states=True)
        shown = tiny_encoder(ids, output_hidden_states=True, output_attentions=True)
    for a, b in zip(fast.hidden_states, shown.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for weights in shown.attentions:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 77))
        assert torch.all(weights.triu(diagonal=1) == 0)  # nothing attends to the future
    assert fast.attentions is None


def test_too_long_input_is_refused(tiny_encoder):
    with pytest.raises(ValueError, match="at most 77"):
        tiny_encoder(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_clip_skip_matches_diffusers_rule(tmp_path, clip_skip):
    """diffusers' encode_prompt(clip_skip=k): final_layer_norm(hidden_states[-(k + 1)]).

    diffusers 0.42.1 reads ``text_encoder.text_model.final_layer_norm``, which transformers 5's
    CLIPTextModel no longer has, so its rule is applied to transformers' outputs here."""
    from sd_parts import load_tokenizer

    reference = reference_text_encoder(hidden_size=32, intermediate_size=64, layers=3, heads=4)
    reference.save_pretrained(tmp_path)
    encoder = load_text_encoder(str(tmp_path))
    ids = load_tokenizer()(["a photo of a cat", "an astronaut riding a horse on the moon"])
    with torch.inference_mode():
        states = reference(ids, output_hidden_states=True).hidden_states
        expected = reference.final_layer_norm(states[-(clip_skip + 1)])
        ours = encoder(ids, clip_skip=clip_skip).last_hidden_state
        default = encoder(ids).last_hidden_state
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    # skipping layers gives other embeddings; skipping none is the default
    assert torch.equal(ours, default) == (clip_skip == 0)


@pytest.mark.parametrize("clip_skip", [None, 0, 1])
def test_appended_word_changes_only_later_positions(tiny_encoder, clip_skip):
    """Causal attention: a word appended to a prompt leaves every position before it as it was,
    and changes every position from it on, padding included."""
    from sd_parts import load_tokenizer

    tokenizer = load_tokenizer()
    ids = tokenizer(["a photo of a cat", "a photo of a cat sitting"])
    first_new = 1 + len(tokenizer.tokenize("a photo of a cat"))  # after BOS and the 5 tokens
    with torch.inference_mode():
        short, longer = tiny_encoder(ids, clip_skip=clip_skip).last_hidden_state
    change = (short - longer).abs().amax(dim=-1)  # (77,)
    assert change[:first_new].max() < 1e-6
    assert change[first_new:].min() > 1e-3


@pytest.mark.parametrize("clip_skip", [-1, 2, True, 1.0])
def test_clip_skip_out_of_range_is_refused(tiny_encoder, clip_skip):
    with pytest.raises(ValueError, match="clip_skip must be None or an integer from 0 to 1"):
        tiny_encoder(torch.zeros(1, 77, dtype=torch.long), clip_skip=clip_skip)
