//! Redis permission cache (being written).
