"""Model code that teachers and students share: the signal models' base (``base.py``),
the transformer blocks of the lead-token models (``blocks.py``) and the masked-modelling
foundation models of the seed papers (``masked.py``, ``csfm.py``, ``lamae.py``).

Importing a model module registers its configuration and classes with transformers'
``AutoConfig`` / ``AutoModel`` / ``AutoModelForPreTraining``; the student families
(``students/``) add size presets, the ``foundation`` teacher (``teachers/``) loads saved
ones. Above ``distill.data``, below the model packages.
"""
