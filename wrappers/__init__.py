"""The thin programs over libtarpit: tarpit-smtpd, tarpitctl, tarpit-sink."""
