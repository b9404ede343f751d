//! `/proc/<pid>/maps` text, read as data: the file-backed mappings and the
//! object a library name prefix resolves to. Pure parsing; the callers read
//! the file (the hooks check and the UCX facts).

/// One file-backed line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileMapping<'a> {
    /// First and one-past-last address.
    pub start: usize,
    pub end: usize,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// Absolute path (spaces kept).
    pub path: &'a str,
}

/// The file-backed mappings in `/proc/<pid>/maps` text; anonymous and
/// special (`[heap]`, ...) lines and malformed ones are skipped.
pub(crate) fn file_mappings(maps: &str) -> impl Iterator<Item = FileMapping<'_>> {
    maps.lines().filter_map(|line| {
        let mut fields = line.splitn(6, ' ');
        let (range, _perms, offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        let path = fields.next()?.trim_start();
        let (start, end) = range.split_once('-')?;
        Some(FileMapping {
            start: usize::from_str_radix(start, 16).ok()?,
            end: usize::from_str_radix(end, 16).ok()?,
            offset: u64::from_str_radix(offset, 16).ok()?,
            path,
        })
        .filter(|m| m.path.starts_with('/'))
    })
}

/// The path of the first mapped object whose file name starts with `prefix`.
pub(crate) fn loaded_object<'a>(maps: &'a str, prefix: &str) -> Option<&'a str> {
    file_mappings(maps).map(|m| m.path).find(|path| path.rsplit('/').next().is_some_and(|name| name.starts_with(prefix)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_file_backed_mappings_and_loaded_objects() {
        let maps = "7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libucp.so.0.0.0\n\
                    7f02-7f03 r--p 00000000 08:01 2 /opt/ucx/lib/libuct.so.0\n\
                    7f04-7f05 rw-p 00000000 00:00 0 \n";
        assert_eq!(loaded_object(maps, "libuct.so"), Some("/opt/ucx/lib/libuct.so.0"));
        assert_eq!(loaded_object(maps, "libucs.so"), None);
        let with_space =
            "7f06-7f08 r--p 00001000 08:01 3                          /opt/my ucx/libuct.so.0\n7f09-7f0a rw-p 00000000 00:00 0    [heap]\n";
        assert_eq!(
            file_mappings(with_space).collect::<Vec<_>>(),
            [FileMapping { start: 0x7f06, end: 0x7f08, offset: 0x1000, path: "/opt/my ucx/libuct.so.0" }]
        );
    }
}
