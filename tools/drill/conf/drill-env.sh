# Replaced by the bootstrap action (memory sized from the node, directories).
