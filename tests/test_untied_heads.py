"""A student whose untied output projection stays dense (mT5, MADLAD-400 with the default
``decompose_layers``) reloads: transformers 5 builds T5 models tied whatever their config says, so
the saved head must be untied again before the weights load."""

import pytest
import torch

from helpers import FAMILIES
from matrix_decomposition import decompose_, default_targets, load_compressed_model, save_compressed_model

MT5 = next(f for f in FAMILIES if f.name == "mt5")


@pytest.mark.parametrize("targets", ["layers", "head too"])
def test_untied_head_reloads_with_the_same_outputs(targets, tiny_tokenizer, tmp_path):
    model = MT5.make(tiny_tokenizer)
    keys = default_targets(model) + (["lm_head.weight"] if targets == "head too" else [])
    decompose_(model, keys, 4)
    save_compressed_model(model, tmp_path / "out", tiny_tokenizer)
    reloaded = load_compressed_model(tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 1]])
    start = torch.tensor([[model.config.decoder_start_token_id, 8, 9]])
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=start).logits
        got = reloaded(input_ids=ids, decoder_input_ids=start).logits
    torch.testing.assert_close(got, expected)
    if targets == "layers":  # the head is a table of its own again, not the embedding's
        assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
