"""What the engine holds: the model bundle type, the built-in loader and the Hugging Face
adapter."""
