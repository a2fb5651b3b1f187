//! canal triggers (placeholder while dependencies build).
