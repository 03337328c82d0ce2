"""Wrappers that make any method private, anchored or encrypted, and the one place that composes them.

* :mod:`~secure_fedvlp.wrappers.dpsgd`: DP-SGD around a method's trainer (Opacus), ledger first;
* :mod:`~secure_fedvlp.wrappers.anchors`: noised global anchors (strategy mixin, client extension);
* :mod:`~secure_fedvlp.wrappers.encryption`: CKKS-encrypted aggregation (client mod, strategy wrapper, release);
* :mod:`~secure_fedvlp.wrappers.compose`: the config's choice of wrappers.
"""
