# $1 is 0 on erase, 1 on upgrade.
if [ "$1" = "0" ] && command -v systemctl >/dev/null 2>&1; then
    [ -d /run/systemd/system ] && systemctl stop doved.service >/dev/null 2>&1 || true
    systemctl disable doved.service >/dev/null 2>&1 || true
fi
exit 0
