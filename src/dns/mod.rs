//! DNS: the records a domain needs, and checking them through a real resolver.
