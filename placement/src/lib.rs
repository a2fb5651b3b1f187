//! canal placement (placeholder while dependencies build).
