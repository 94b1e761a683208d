"""modern_llm: a small decoder-only LM library and the DPO loss family.

Public entry points (as documented by the seed API):

- ``modern_llm.alignment.dpo_loss.dpo_loss``
- ``modern_llm.models.transformer.ModernDecoderLM``
"""

__version__ = "0.1.0"
