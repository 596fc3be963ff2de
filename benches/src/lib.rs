//! Oona benches: see `benches/`.
