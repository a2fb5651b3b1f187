//! canal testnet (placeholder while dependencies build).
