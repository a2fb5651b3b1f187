//! canal consensus (placeholder while dependencies build).
