"""The public Drafter API (the one seam third parties use) and its building blocks:
the protocol and draft shapes, the coupled sampling rule a drafter may share, drafting
structures (tries, memories, datastores), the drafter registry and hybrid composition.

The lowest layer: it imports nothing else of the package."""
