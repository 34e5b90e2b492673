if command -v systemctl >/dev/null 2>&1; then
    systemctl enable doved.service >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
        systemctl restart doved.service || echo "dove: doved did not start; see 'journalctl -u doved'" >&2
    fi
fi
exit 0
