"""Task data readers. Each reads local files (or files a package ships) and never touches the network."""
