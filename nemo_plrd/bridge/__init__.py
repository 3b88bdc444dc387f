"""A PLRD stage as a Megatron-Bridge pretraining job.

``nemo_plrd.bridge.config`` puts the stage's ``plrd:`` section on Bridge's ``ConfigContainer``;
its modules import Bridge, this package does not, so ``nemo_plrd`` works without Bridge.
"""
