//! WASI's flag types as plain numbers, for images: bindgen's flag structs have no
//! `from_bits`, so the known flags are listed and anything else is refused.

use wasmtime_wasi::p2::bindings::filesystem::types::{DescriptorFlags, OpenFlags, PathFlags};

macro_rules! from_bits {
    ($name:ident, $ty:ty, [$($flag:ident),*]) => {
        pub(crate) fn $name(bits: u32) -> Option<$ty> {
            let mut flags = <$ty>::empty();
            let mut known = 0u32;
            $(
                let flag = <$ty>::$flag;
                known |= flag.as_array()[0];
                if bits & flag.as_array()[0] != 0 {
                    flags |= flag;
                }
            )*
            (bits & !known == 0).then_some(flags)
        }
    };
}

from_bits!(path, PathFlags, [SYMLINK_FOLLOW]);
from_bits!(open, OpenFlags, [CREATE, DIRECTORY, EXCLUSIVE, TRUNCATE]);
from_bits!(
    descriptor,
    DescriptorFlags,
    [READ, WRITE, FILE_INTEGRITY_SYNC, DATA_INTEGRITY_SYNC, REQUESTED_WRITE_SYNC, MUTATE_DIRECTORY]
);

/// The number of a flag value (the inverse of the functions above).
pub(crate) fn bits(as_array: [u32; 1]) -> u32 {
    as_array[0]
}
