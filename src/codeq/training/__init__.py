"""The training engine: one epoch of training and one validation pass (``loop``), how a step runs on its device
(``step_settings``), data-parallel processes (``distributed``) and the allocator setting (``memory``)."""
