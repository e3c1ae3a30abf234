//! DKIM keys: generation, selectors and the rotation state machine (pure core).
