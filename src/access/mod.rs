//! Cross-tenant access: which suppliers may read which brands, with which permissions; the
//! Redis permission cache in front of it.

pub mod cache;
