"""Config sections shared by the named configs (not a config itself: no get_config)."""

from ml_collections import ConfigDict, config_dict


def tiny_llama() -> ConfigDict:
    """The model section: a local HF Llama at ``path``, or else this tiny Llama (1.2M params)
    trained from scratch."""
    return ConfigDict(dict(
        path=config_dict.placeholder(str),  # a local HF Llama folder; None: the tiny model
        pad_to_eos=False,  # for tokenizers without a pad token (most Llama tokenizers)
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        dtype="float32",
        param_dtype="float32",
        remat="none",  # "dots", "dots_attn" or "full" trade compute for activation memory
        attention="auto",  # "ffrag" (custom-VJP, CPU default), "xla" (GPU default: cuDNN)
    ))


def strategy_settings() -> ConfigDict:
    """``fl.settings``: the settings of the federated strategies that have any (each takes its
    own; ffrag_jax.federated.strategies.from_config)."""
    return ConfigDict(dict(
        lr=1.0,  # fedavgm/fedadam/fedyogi: the server's step on (global - average)
        momentum=0.9,  # fedavgm
        b1=0.9, b2=0.99, tau=1e-3,  # fedadam/fedyogi (tau: their epsilon)
        trim=0.2,  # trimmed_mean: the fraction dropped at each end, per coordinate
        mu=0.01,  # fedprox: the weight of the proximal term
    ))


def dp() -> ConfigDict:
    """``fl.dp``: client-level differential privacy on the clients' side
    (ffrag_jax.federated.privacy): each client's update clipped to L2 norm ``clip`` and
    Gaussian noise of std ``noise_multiplier * clip`` added before it is sent; ``epsilon``
    (if set) picks the noise multiplier that reaches it after fl.rounds rounds at ``delta``.
    ``clip=0``: off."""
    return ConfigDict(dict(clip=0.0, noise_multiplier=0.0,
                           epsilon=config_dict.placeholder(float), delta=1e-5))


def flower() -> ConfigDict:
    """``fl.flower``: the Flower engine's settings (``fl.engine="flower"``)."""
    return ConfigDict(dict(
        # A round goes on with the clients that answered, if they are at least this fraction
        # of the selected ones; a client that has not answered after round_timeout seconds is
        # left out of the round.
        min_fraction=0.5,
        round_timeout=600.0,
        connect_timeout=120.0,  # for all fl.num_clients SuperNodes to connect and answer
        # Secure aggregation (Flower's SecAgg+) for the strategies whose rule needs only the
        # weighted mean of the clients' adapters (fedavg, zeropad, fedprox, ffa, fedavgm,
        # fedadam, fedyogi): the server learns that mean and no single adapter. Every value a
        # client sends must lie in [-secagg_clip, secagg_clip] (2**22 levels over it).
        secagg=False,
        secagg_clip=8.0,
        # Simulation runtime only: each virtual client's share of the machine (Ray).
        client_cpus=1.0,
        client_gpus=0.0,
    ))


def pretrain(steps: int = 800) -> ConfigDict:
    """Pretraining of the tiny model on a synthetic base domain (skipped with model.path or
    steps=0)."""
    return ConfigDict(dict(
        steps=steps, domain="geography", num_examples=4000, batch_size=32, grad_accum=1,
        lr=3e-3, warmup_steps=30, weight_decay=0.01, max_grad_norm=1.0, response_only=False,
        seed=0,
        # Another finished run's folder: its pretrained base is restored (read only) instead
        # of pretraining again. Its task, seed, model, tokenizer, data, boundary and pretrain
        # settings must equal this run's, so the base is the one this run would pretrain: a
        # sweep over strategies or privacy settings pretrains once per seed.
        from_run=config_dict.placeholder(str),
    ))
