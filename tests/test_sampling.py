"""KV-cache sampling gives exactly the tokens of nanoGPT's cache-free loop, for the same seed."""
import pytest
import torch

import experiment as ex


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = ex.GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
    return ex.GPT(config).eval()


def both_ways(model, prompt, new_tokens, temperature, top_k, seed):
    cache_free = ex.generate(model, prompt, new_tokens, temperature, top_k, torch.Generator().manual_seed(seed),
                             use_cache=False)
    cached = ex.generate(model, prompt, new_tokens, temperature, top_k, torch.Generator().manual_seed(seed),
                         use_cache=True)
    return cache_free, cached


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("temperature, top_k", [(0.8, 200), (1.0, None), (1.3, 5), (0.5, 1)])
@pytest.mark.parametrize("batch, prompt_len", [(1, 1), (1, 20), (4, 3), (2, 45)])  # 45 > block_size
def test_cached_sampling_matches_cache_free_token_for_token(model, seed, temperature, top_k, batch, prompt_len):
    prompt = torch.randint(0, 65, (batch, prompt_len), generator=torch.Generator().manual_seed(100 + seed))
    cache_free, cached = both_ways(model, prompt, 70, temperature, top_k, seed)  # 70 new: the window slides
    assert cached.shape == (batch, prompt_len + 70)
    assert torch.equal(cached, cache_free)
    assert torch.equal(cached[:, :prompt_len], prompt)


def test_different_seeds_give_different_samples(model):
    prompt = torch.zeros((1, 1), dtype=torch.long)
    a = ex.generate(model, prompt, 50, 1.0, None, torch.Generator().manual_seed(1))
    b = ex.generate(model, prompt, 50, 1.0, None, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_cached_logits_equal_full_forward(model):
    """The cache path computes the same function: the last position's logits agree to float precision."""
    idx = torch.randint(0, 65, (2, 20), generator=torch.Generator().manual_seed(7))
    caches = [{} for _ in model.transformer.h]
    with torch.no_grad():
        model(idx[:, :12], caches=caches)
        for t in range(12, 20):
            step_logits, _ = model(idx[:, t:t + 1], caches=caches, start_pos=t)
            full_logits, _ = model(idx[:, :t + 1])
            torch.testing.assert_close(step_logits, full_logits, rtol=1e-5, atol=1e-5)
