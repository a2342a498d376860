"""Reference semi-supervised Cityscapes trainer: SwiftNet + one-way consistency with PhTPS.

Modules: ``data`` (Cityscapes loader), ``synthetic`` (a generated dataset in the same
layout), ``swiftnet`` (the model), ``engine`` (training steps, evaluation, checkpoints),
``config``, ``distributed``, ``metrics``, ``visualize``; ``train`` is the command line.
"""
