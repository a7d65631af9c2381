"""Model drafters' shared parts, importable by third-party drafters too: the weights
registry (:mod:`.weights`), the trainable protocol and its batch (:mod:`.trainable`),
EAGLE-3 (:mod:`.eagle3`), draft language models (:mod:`.draft_lm`) and dynamic trees
(:mod:`.tree`). Training them is :mod:`pytest_specdec.training`'s."""
