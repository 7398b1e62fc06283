//! A MAC address: the one type the plan, the netlink edge and the CNI result
//! share.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The six bytes a netlink attribute carries; `None` for another length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(bytes).ok().map(Mac)
    }
}

/// `aa:bb:cc:dd:ee:ff`, as `ip` prints it.
impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_read_six_bytes_and_print_as_ip_does() {
        let mac = Mac::from_bytes(&[0xee, 1, 2, 3, 4, 0xff]).unwrap();
        assert_eq!(mac.to_string(), "ee:01:02:03:04:ff");
        assert_eq!(Mac::from_bytes(&[1, 2, 3]), None);
    }
}
