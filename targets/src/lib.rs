//! kiln device descriptors: what a target device is and what the compiler may assume about it.
