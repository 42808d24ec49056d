//! `netcat HOST:PORT`: connects over TCP (a name is looked up first), sends its stdin,
//! closes its side, and prints what comes back. Exits 2 with the error when the
//! connection cannot be made (as it cannot when the host grants no network).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

fn main() {
    let Some(address) = std::env::args().nth(1) else {
        eprintln!("usage: netcat HOST:PORT");
        std::process::exit(64);
    };
    let mut stream = match TcpStream::connect(&address) {
        Ok(stream) => stream,
        Err(e) => {
            eprintln!("netcat: connecting to {address}: {e}");
            std::process::exit(2);
        }
    };
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).expect("reading stdin");
    stream.write_all(&input).expect("sending");
    stream.shutdown(Shutdown::Write).expect("closing the sending side");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("receiving");
    std::io::stdout().write_all(&reply).expect("writing stdout");
}
