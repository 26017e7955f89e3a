"""The GPT module: shapes, causality, weight tying, which parameters get weight decay."""

import torch

from tinytale.model import GPT, GPTConfig, param_groups


def small_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=24, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))


def test_logits_shape_and_loss():
    model = small_gpt()
    idx = torch.randint(0, 24, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 24)
    assert loss.shape == () and torch.isfinite(loss)


def test_initial_loss_is_near_uniform_guessing():
    model = small_gpt()
    idx = torch.randint(0, 24, (8, 16))
    _, loss = model(idx, torch.randint(0, 24, (8, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(24.0)).item()) < 0.2


def test_future_tokens_cannot_change_earlier_logits():
    model = small_gpt().eval()
    idx = torch.randint(0, 24, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 5) % 24
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_head_is_tied_to_token_embedding():
    model = small_gpt()
    assert model.lm_head.weight is model.wte.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_weight_decay_only_on_matrices():
    model = small_gpt()
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_dropout_is_active_only_in_training():
    model = small_gpt(dropout=0.5)
    idx = torch.randint(0, 24, (2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(idx)[0], model(idx)[0])


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    import torch

    from tinytale.sample import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.79)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_k=1, top_p=0.99)) == [True, False, False, False]


def test_every_model_key_of_an_experiment_is_a_gpt_config_field():
    import dataclasses

    from tinytale.config import Config, ModelConfig
    from tinytale.inference import build_model

    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert fields - {"vocab_size"} == {f.name for f in dataclasses.fields(ModelConfig)}
    model = build_model(Config(model=ModelConfig(n_layer=1, n_embd=32, dropout=0.1,
                                                 attn_dropout=0.05)), 24)
    assert (model.cfg.n_layer, model.cfg.n_embd, model.cfg.dropout, model.cfg.attn_dropout,
            model.cfg.vocab_size) == (1, 32, 0.1, 0.05, 24)
    assert model.blocks[0].attn.attn_dropout == 0.05


def test_attention_dropout_has_its_own_key_and_is_off_by_default():
    # The attention output, read where it enters the projection, shows whether the attention
    # weights were dropped; the block's output still carries the residual dropout.
    def attention_outputs(attn_dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        block = small_gpt(dropout=0.5, attn_dropout=attn_dropout).blocks[0].attn.train()
        seen = []
        block.proj.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        x = torch.randn(2, 8, 16)
        with torch.no_grad():
            outs = block(x), block(x)
        return seen, outs

    seen, outs = attention_outputs(0.0)
    assert small_gpt(dropout=0.5).cfg.attn_dropout == 0.0
    assert torch.equal(seen[0], seen[1])  # attention weights intact: SDPA got dropout_p 0
    assert not torch.equal(outs[0], outs[1])  # the residual dropout still acts
    seen, _ = attention_outputs(0.5)
    assert not torch.equal(seen[0], seen[1])
