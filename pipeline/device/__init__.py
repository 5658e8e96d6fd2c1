"""What goes to the device: the Raspberry Pi bundle (bundle/, bundle.tar.gz)."""
