# Sourced by the VM scripts that fetch packages from bookworm-backports: apt options for a
# package list of its own (deb.debian.org, the mirror the host already uses), kept under
# /var/cache/dove, so the host's apt sources are left as they are.
# Defines: backports_apt_opts (an array of apt options) and backports_refresh.
backports_lists=/var/cache/dove/apt-bookworm-backports
mkdir -p "$backports_lists/lists/partial"
echo "deb http://deb.debian.org/debian bookworm-backports main" > "$backports_lists/sources.list"
backports_apt_opts=(-o "Dir::Etc::sourcelist=$backports_lists/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$backports_lists/lists" -o APT::Get::List-Cleanup=0)
backports_refresh() { apt-get "${backports_apt_opts[@]}" update -qq >&2; }
