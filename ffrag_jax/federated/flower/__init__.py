"""Flower as the federation engine (``fl.engine="flower"``): the job's clients as Flower
nodes, each with its own data, and the same pure core on both sides.

* :mod:`.client`: the ClientApp (``ffrag_jax.federated.flower.client:app``);
* :mod:`.server`: the server's side of a round over a Flower ``Grid``;
* :mod:`.apps`: the ServerApp for ``flwr run`` (SuperLink and SuperNodes on real processes);
* :mod:`.simulation`: the job through Flower's simulation runtime, in one command;
* :mod:`.records`: what crosses the wire, and its checks.

Flower is an optional dependency: ``pip install -e ".[flower]"``.
"""
