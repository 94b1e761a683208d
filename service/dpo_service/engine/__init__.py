"""The one owner of the model: admission control, the dynamic batcher, the worker thread,
log-prob forward passes, the train step and checkpointing of the training state. Returns plain
result dataclasses; never builds wire (pydantic/protobuf) objects."""
